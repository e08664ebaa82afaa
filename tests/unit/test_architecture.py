"""The shape of the package: dependencies point one way, functions stay short, the config
directory is defined once."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mm_moe"

# Lowest first: a module may import from its own layer or a lower one (longest prefix wins).
LAYERS = [
    ("base", ["mm_moe.errors", "mm_moe.modality", "mm_moe.utils", "mm_moe.config.validate"]),
    ("model", ["mm_moe.model"]),
    ("components", ["mm_moe.tokenization", "mm_moe.parallel", "mm_moe.data"]),
    ("checkpoint", ["mm_moe.checkpoint"]),
    (
        "run",
        [
            "mm_moe.trainer",
            "mm_moe.eval",
            "mm_moe.config",
            "mm_moe.sampling",
            "mm_moe.api",
            *(
                f"mm_moe.upcycle.{m}"
                for m in ("upcycling", "ops", "config", "hf_import", "hf_export", "verify")
            ),
        ],
    ),
    (
        "entry",
        [
            "mm_moe",
            "mm_moe.cli",
            "mm_moe.train",
            "mm_moe.plan",
            "mm_moe.generate",
            "mm_moe.export",
            "mm_moe.tokenization.train_text",
            "mm_moe.tokenization.train_image",
            "mm_moe.upcycle",
        ],
    ),
]
# Same-layer imports that would make a cycle between peers.
FORBIDDEN = [
    ("mm_moe.tokenization", "mm_moe.data"),
    ("mm_moe.tokenization", "mm_moe.parallel"),
    ("mm_moe.parallel", "mm_moe.data"),
    ("mm_moe.parallel", "mm_moe.tokenization"),
    ("mm_moe.eval", "mm_moe.trainer"),
    ("mm_moe.upcycle", "mm_moe.trainer"),
    ("mm_moe.sampling", "mm_moe.trainer"),
]
# Entry points share only the CLI helpers.
ENTRY_SHARED = ("mm_moe.cli",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[int, str]:
    best = (-1, -1, "")
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), rank, prefix))
    assert best[1] >= 0, f"{module} is in no layer"
    return best[1], best[2]


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mm_moe"):
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mm_moe")]
    return found


def _resolves(name: str) -> bool:
    parts = name.split(".")
    base = REPO.joinpath(*parts)
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def test_imports_point_from_higher_layers_to_lower_ones():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        rank, prefix = _layer(source)
        for line, target in _imports(ast.parse(path.read_text())):
            if not _resolves(target):  # `from pkg import name`: the name is not a module
                continue
            target_rank, target_prefix = _layer(target)
            where = f"{path.relative_to(REPO)}:{line} imports {target}"
            if target_rank > rank:
                wrong.append(f"{where} (layer {LAYERS[target_rank][0]} > {LAYERS[rank][0]})")
            elif (prefix, target_prefix) in FORBIDDEN:
                wrong.append(f"{where} (a cycle between peers)")
            elif (
                rank == target_rank == len(LAYERS) - 1
                and target_prefix not in (prefix, *ENTRY_SHARED)
                and target_prefix != "mm_moe"
            ):
                wrong.append(f"{where} (entry points share only {ENTRY_SHARED})")
    assert not wrong, "\n".join(wrong)


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines}")
    assert not long, "\n".join(long)


def test_the_config_directory_is_defined_once():
    definitions = [
        str(p.relative_to(REPO))
        for p in PACKAGE.rglob("*.py")
        if "CONFIG_DIR =" in p.read_text() or "CONFIG_DIR=" in p.read_text()
    ]
    assert definitions == ["mm_moe/cli.py"], definitions
