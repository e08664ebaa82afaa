"""What a checkpoint folder may bring to a command line through `--config-dir`.

`mm_moe.upcycle` writes `<out>/experiment/upcycled.yaml`, a Hydra overlay that
`--config-dir <out> experiment=upcycled` applies. A checkpoint is data, not code: a config file
Hydra would take from a checkpoint folder is read first with `yaml.safe_load` and may set only
the model, its routing and its tokenizers (the top-level keys `model`, `moe`, `tokenizer`).
Anything else is refused before Hydra reads the file, naming the key: `data` (a `pipe:` url
runs a shell on every rank and worker), `hydra` (callbacks and launchers are `_target_`s Hydra
instantiates), a `defaults` list (it would pull in more files), any `_target_`-style key, and
`${...}` interpolations (resolvers read the environment).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mm_moe.errors import UserError

OVERLAY_KEYS = ("model", "moe", "tokenizer")
# What marks a folder as a checkpoint (a step, a run's checkpoint root, an upcycled model).
_MARKERS = ("meta.json", "model.pt", "latest")
_HEADER = re.compile(r"^\s*#\s*@(\S+)\s+(\S+)")


def is_checkpoint_dir(path: Path) -> bool:
    if any((path / marker).exists() for marker in _MARKERS):
        return True
    if (path / "experiment" / "upcycled.yaml").is_file():  # what mm_moe.upcycle writes
        return True
    return any(p.is_dir() for p in path.glob("step_*"))


def _package(text: str) -> str | None:
    """The `# @package` of a Hydra config file, read as Hydra reads its header (blank lines
    skipped, up to the first line that is not a `# @key value` directive)."""
    package = None
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _HEADER.match(line)
        if match is None:
            break
        if match.group(1) == "package":
            package = match.group(2)
    return package


def _check_values(path: Path, node, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{where}.{key}"
            if str(key).startswith("_"):  # _target_, _args_, _partial_, _recursive_ ...
                raise UserError(
                    f"{path}: key '{name}' is refused: a checkpoint's overlay sets config "
                    "values only, never a Hydra _target_ or another '_'-key"
                )
            _check_values(path, value, name)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_values(path, value, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise UserError(
            f"{path}: key '{where}' holds an interpolation ({node!r}); a checkpoint's overlay "
            "holds plain values only"
        )


def read_overlay(path: Path) -> dict:
    """A checkpoint's overlay, read with a safe loader and checked (see the module doc)."""
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not a readable YAML overlay ({exc})") from None
    package = _package(text)
    if package not in (None, "_global_"):
        raise UserError(f"{path}: '# @package {package}' is refused; an overlay is _global_")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{path}: an overlay is a mapping of {', '.join(OVERLAY_KEYS)}")
    for key, value in data.items():
        if key not in OVERLAY_KEYS:
            raise UserError(
                f"{path}: key '{key}' is refused: a checkpoint's overlay may set only "
                f"{', '.join(OVERLAY_KEYS)} (give other keys on the command line)"
            )
        _check_values(path, value, str(key))
    return data


def _chosen_files(overrides: list[str], config_name: str | None, folder: Path) -> list[Path]:
    """Config files (relative to a config dir) the command line chooses: `group=option`
    (multi-select and sweeps included; a glob sweep: every option of `folder`'s group) and the
    primary config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    files = [Path(f"{config_name}.yaml")] if config_name else []
    for o in OverridesParser.create().parse_overrides(overrides):
        group = Path(o.key_or_group.replace(".", "/"))
        value = o.value()
        if o.is_delete():
            continue
        if isinstance(value, Glob):  # matched against the options Hydra finds: take them all
            files += [p.relative_to(folder) for p in (folder / group).glob("*.yaml")]
            continue
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
        else:
            values = value if isinstance(value, list) else [value]
        files += [group / f"{v}.yaml" for v in values if isinstance(v, str) and v]
    return files


def check_config_dir(
    config_dir: str | None, overrides: list[str], config_name: str | None, main_dir: str
) -> None:
    """Refuse what a checkpoint folder given as `--config-dir` would bring, and a user's
    config that a shipped one of the same name hides (UserError)."""
    if not config_dir:
        return
    folder = Path(config_dir)
    if not folder.is_dir():
        return
    if not is_checkpoint_dir(folder):
        _refuse_hidden(folder, Path(main_dir))
        _refuse_unpackaged_experiment(folder, overrides)
        return
    for rel in _chosen_files(overrides, config_name, folder):
        if (folder / rel).is_file() and not (Path(main_dir) / rel).is_file():  # main wins
            read_overlay(folder / rel)


def _refuse_unpackaged_experiment(folder: Path, overrides: list[str]) -> None:
    """An experiment overlay sets keys of every group: without its first line
    `# @package _global_` Hydra nests them under `experiment`, and the errors that follow
    ("unknown config key 'experiment'") do not say why."""
    from hydra.plugins.config_source import ConfigSource

    for rel in _chosen_files(overrides, None, folder):
        path = folder / rel
        if rel.parts[0] != "experiment" or not path.is_file():
            continue
        try:  # Hydra's own reading: the `# @...` lines before any other line
            package = ConfigSource._get_header_dict(path.read_text()).get("package")
        except Exception:  # noqa: BLE001 - a header Hydra cannot parse is no package line
            package = None
        if package != "_global_":
            raise UserError(
                f"{path}: an experiment overlay sets keys of every group, so it must begin "
                "with the line `# @package _global_` (first, before any other comment; as "
                "configs/experiment/*.yaml do); without it Hydra puts its keys under "
                "`experiment`"
            )


def _refuse_hidden(folder: Path, main_dir: Path) -> None:
    """Hydra searches the shipped configs before a `--config-dir`: a user's edited copy of a
    preset under the preset's own name (`moe/moma_4t4i_ec.yaml`) is never read, and the run
    would train the shipped one without a word. Identical copies change nothing and pass."""
    hidden = []
    for path in sorted(folder.rglob("*.yaml")):
        rel = path.relative_to(folder)
        shipped = main_dir / rel
        if shipped.is_file() and shipped.read_bytes() != path.read_bytes():
            hidden.append(rel)
    if hidden:
        first = hidden[0]
        mine = first.with_name(f"{first.stem}_mine.yaml")
        more = (
            f" (and {len(hidden) - 1} more: {', '.join(map(str, hidden[1:4]))})"
            if len(hidden) > 1
            else ""
        )
        choice = (
            f"{first.parent.as_posix()}={mine.stem}"
            if first.parent != Path(".")
            else f"--config-name {mine.stem}"
        )
        raise UserError(
            f"--config-dir {folder}: {first}{more} has the name of a shipped config, which "
            "Hydra reads instead of yours (the shipped configs are searched first); give "
            f"yours a name of its own, e.g. {mine}, and choose it: {choice}"
        )
