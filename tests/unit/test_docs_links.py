"""Every docs page the project cites exists: configs, code, data pipelines and the docs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CITED = re.compile(r"docs/[A-Za-z0-9_./-]+\.(?:md|png)")


def test_every_cited_docs_page_exists():
    sources = [REPO / "README.md"]
    for folder in ("configs", "mm_moe", "data_pipelines", "docs", "scripts", "launch", "docker"):
        sources += [p for p in (REPO / folder).rglob("*") if p.is_file()]
    missing = {}
    for path in sources:
        if path.suffix not in (".py", ".md", ".yaml", ".sh", ".sbatch", "") or "__pycache__" in str(
            path
        ):
            continue
        for cited in CITED.findall(path.read_text(errors="ignore")):
            target = (path.parent / cited) if path.parent.name == "docs" else REPO / cited
            if not target.exists() and not (REPO / cited).exists():
                missing.setdefault(cited, []).append(str(path.relative_to(REPO)))
    assert not missing, missing


LINK = re.compile(r"\]\(([A-Za-z0-9_./-]*\.md)?#([^)]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_markdown_anchor_names_a_heading():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in LINK.findall(page.read_text()):
            linked = (page.parent / target) if target else page
            headings, fenced = [], False
            for line in linked.read_text().splitlines():
                fenced ^= line.startswith("```")
                if line.startswith("#") and not fenced:
                    headings.append(_slug(line.lstrip("#")))
            if anchor not in headings:
                broken.append(f"{page.relative_to(REPO)}: {target}#{anchor}")
    assert not broken, broken
