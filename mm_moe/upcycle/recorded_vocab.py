"""The unified vocabulary an mm_moe export records beside config.json, read back by the
Hugging Face import, so that an export imported again keeps every id where it was.

config.json knows one flat vocabulary; mm_moe lays its ids out (text, the five specials, the
image codes: mm_moe/tokenization/vocab.py). Without the layout an import would take every id as
text and append a new codebook: image codes and boi/eoi would become text tokens, images new
untrained rows. `python -m mm_moe.export` therefore writes

    vocab.yaml              the layout (Vocab.save)
    mm_moe_tokenizer.yaml   the tokenizers that made it (tokenizer.text / image / sizes)
    mm_moe_tokenizer/       their artifacts where they have some (sentencepiece text.model,
                            the VQ's vq.pt and vq.yaml; a published tokenizer's files lie
                            beside config.json as usual)

and `source_format=hf` uses them when the folder holds them. They are data: read with
yaml.safe_load, checked against config.json and the tokenizers; a file that does not fit is
a UserError naming it. A folder without them (a model from elsewhere) imports as before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from mm_moe.errors import UserError
from mm_moe.tokenization.config import SPECIALS
from mm_moe.tokenization.vocab import Vocab

VOCAB_FILE = "vocab.yaml"
TOKENIZER_FILE = "mm_moe_tokenizer.yaml"
ARTIFACTS_DIR = "mm_moe_tokenizer"
# The tokenizer keys recorded: which tokenizers, and the sizes that fix the stand-ins' codebook.
RECORDED_KEYS = ("text", "image", "image_size", "grid", "levels")
ARTIFACTS = {"sentencepiece": ("text.model",), "vq": ("vq.pt", "vq.yaml", "metrics.json")}


def write(out: Path, vocab: Vocab, tok_cfg) -> None:
    """The layout, the tokenizer keys and their artifacts into an export folder `out`."""
    vocab.save(out / VOCAB_FILE)
    fields = {key: getattr(tok_cfg, key) for key in RECORDED_KEYS}
    header = "# mm_moe's tokenizers for vocab.yaml (python -m mm_moe.upcycle source_format=hf)\n"
    (out / TOKENIZER_FILE).write_text(header + yaml.safe_dump(fields, sort_keys=False))
    names = ARTIFACTS.get(tok_cfg.text, ()) + ARTIFACTS.get(tok_cfg.image, ())
    for name in names:
        if (Path(tok_cfg.path) / name).is_file():
            (out / ARTIFACTS_DIR).mkdir(exist_ok=True)
            shutil.copy(Path(tok_cfg.path) / name, out / ARTIFACTS_DIR / name)


def _safe_yaml(path: Path, what: str):
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable {what}: {exc}") from exc


def tokenizer_fields(folder: str | Path) -> dict:
    """The recorded tokenizer keys (`tokenizer.*` of the import's target; command-line keys
    still apply after), with `path` where their artifacts lie; {} when none are recorded."""
    from mm_moe.config import from_dict
    from mm_moe.tokenization.config import TokenizerConfig

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        return {}
    fields = _safe_yaml(path, "tokenizer record")
    if not isinstance(fields, dict) or not set(fields) <= set(RECORDED_KEYS):
        raise UserError(
            f"{path}: must map some of {', '.join(RECORDED_KEYS)} to values (what "
            f"mm_moe.export writes), got {fields!r}"
        )
    artifacts = Path(folder) / ARTIFACTS_DIR
    fields = {**fields, "path": str(artifacts if artifacts.is_dir() else Path(folder))}
    try:
        from_dict(TokenizerConfig, fields, "tokenizer")
    except ValueError as exc:  # ConfigError and UserError both
        raise UserError(f"{path}: {exc}") from exc
    return fields


def read_vocab(folder: str | Path, hf: dict) -> Vocab | None:
    """The recorded layout, checked against config.json; None when the folder has none."""
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        return None
    fields = _safe_yaml(path, "vocabulary file")
    if not isinstance(fields, dict):
        raise UserError(f"{path}: must map Vocab's fields to ids (Vocab.save), got {fields!r}")
    vocab = Vocab.load(path)
    if vocab.size > hf["vocab_size"]:
        raise UserError(
            f"{path}: {vocab.size} ids, but config.json has vocab_size={hf['vocab_size']} rows: "
            "every id needs one (is it this model's vocab.yaml?)"
        )
    for name in ("bos", "eos", "pad"):
        given = hf.get(f"{name}_token_id")
        if isinstance(given, int) and given != getattr(vocab, name):
            raise UserError(
                f"{path}: {name}={getattr(vocab, name)}, but config.json says "
                f"{name}_token_id={given}: the two files describe different vocabularies"
            )
    if hf.get("model_type") == "chameleon":
        _check_chameleon(path, vocab, hf)
    return vocab


def _check_chameleon(path: Path, vocab: Vocab, hf: dict) -> None:
    from mm_moe.upcycle.hf_import import CHAMELEON_BOI, CHAMELEON_EOI, chameleon_image_ids

    vocab_map = hf["vocabulary_map"]
    same = vocab.image_ids == chameleon_image_ids(hf)
    same = same and (vocab.boi, vocab.eoi) == (vocab_map[CHAMELEON_BOI], vocab_map[CHAMELEON_EOI])
    if not same:
        raise UserError(
            f"{path}: its image ids or boi/eoi differ from config.json's vocabulary_map"
        )


def check_image_tokenizer(vocab: Vocab, codebook_size: int, tok_cfg, folder) -> None:
    if codebook_size != vocab.image_size:
        raise UserError(
            f"{Path(folder) / VOCAB_FILE}: {vocab.image_size} image codes, but the image "
            f"tokenizer (tokenizer.image={tok_cfg.image}, grid={tok_cfg.grid}, "
            f"levels={tok_cfg.levels}) has {codebook_size}: keep the export's image tokenizer "
            f"({TOKENIZER_FILE}), or remove {VOCAB_FILE} to lay out a new vocabulary"
        )


def layout_problems(recorded: Vocab, written: Vocab, ours_VD, source_VD) -> list[str]:
    """How the written checkpoint's vocabulary differs from the source's recorded one: the
    fields that differ, else the image-code and special rows that are not the source's."""
    fields = ("text_size", "image_offset", "image_size", *SPECIALS, "size")
    differ = [
        f"{name} {getattr(written, name)} (the source's {getattr(recorded, name)})"
        for name in fields
        if getattr(written, name) != getattr(recorded, name)
    ]
    if written.image_ids != recorded.image_ids:
        differ.append("image_ids differ")
    if differ:
        return ["the written vocab.yaml differs from the source's: " + ", ".join(differ)]
    ids = recorded.image_token_ids(range(recorded.image_size)).tolist()
    ids += [getattr(recorded, name) for name in SPECIALS]
    ids_N = torch.tensor(ids, dtype=torch.long)
    if not torch.equal(ours_VD[ids_N].float(), source_VD[ids_N].float()):
        return ["the embedding rows of image codes or specials are not the source's"]
    return []
