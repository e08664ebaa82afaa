"""Check command-line overrides against the schema before Hydra composes anything.

Hydra's own error for `trainer.max_stepz=5` names the key but not what is valid; this check
runs first and says both.
"""

from __future__ import annotations

from mm_moe.config.validate import ConfigError, did_you_mean, valid_keys

# Hydra flags that take the next argument as their value.
_FLAGS_WITH_VALUE = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "--experimental-rerun",
}


def options_first(argv: list[str]) -> list[str]:
    """argv with Hydra's flags (and their values) moved before the overrides, in their order:
    argparse refuses a flag after the overrides (`experiment=x --config-dir DIR`: "unrecognized
    arguments"), which users and wrapper scripts that append their own flags write. A bare
    `--info` (its value is optional) goes last, where it cannot take an override as its value."""
    flags, overrides, last, i = [], [], [], 0
    while i < len(argv):
        arg = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else None
        if not arg.startswith("-"):
            overrides.append(arg)
        elif arg == "--info" and (following is None or "=" in following or following[0] == "-"):
            last.append(arg)
        else:
            flags.append(arg)
            if arg in _FLAGS_WITH_VALUE and following is not None:
                flags.append(following)
                i += 1
        i += 1
    return flags + overrides + last


def command_line(argv: list[str]):
    """argv as Hydra's own parser reads it (`.overrides`, `.config_dir`, `.config_name`, ...):
    flags abbreviated as argparse allows (`--config-d DIR`) included."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(argv)


def check_syntax(overrides: list[str]) -> None:
    """Raise ConfigError, one line, for an override Hydra's grammar cannot parse (Hydra's own
    handler would print it over several lines with exit status 1)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_override(arg)
        except HydraException as exc:
            detail = " ".join(str(exc).split())
            raise ConfigError(
                f"cannot parse the override {arg!r}: {detail} (Hydra's override grammar: "
                "key=value, a list as key=[1,2], a string with brackets, commas or "
                "non-ASCII letters quoted: key='a [b]', files=['données.txt'])"
            ) from None


def check_overrides(argv: list[str], schema: type, groups: tuple[str, ...]) -> list[str]:
    """Raise ConfigError for an override Hydra cannot parse or whose key is not in `schema`.

    Returns argv with every checked key override in Hydra's `++key=value` form (add or
    override), so a schema key that a preset's YAML leaves out can still be set."""
    check_syntax(command_line(argv).overrides)
    out, skip_next = [], False
    for arg in argv:
        out.append(arg)
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("-"):
            skip_next = arg in _FLAGS_WITH_VALUE
            continue
        if "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if key.startswith(("+", "~", "hydra")) or "/" in key or "@" in key:
            continue  # additions, deletions, Hydra's own keys and group paths
        if key in groups:
            continue  # a config-group choice such as experiment=tiny_dense
        *parents, leaf = key.split(".")
        options = valid_keys(schema, parents)
        if options is None:  # a free-form mapping (e.g. moe.experts_per_modality): any key goes
            out[-1] = "++" + arg
            continue
        if leaf not in options:
            for depth, parent in enumerate(parents):  # the first unknown part of the key
                above = valid_keys(schema, parents[:depth]) or set()
                if parent not in above:
                    where = f"under '{'.'.join(parents[:depth])}'" if depth else "at the top level"
                    raise ConfigError(
                        f"unknown config key '{key}': '{parent}' is not a key "
                        f"{where}.{did_you_mean(parent, above)} Valid keys {where}: "
                        f"{', '.join(sorted(above))}"
                    )
            where = f"under '{'.'.join(parents)}'" if parents else "at the top level"
            hint = did_you_mean(leaf, options)
            raise ConfigError(
                f"unknown config key '{key}'.{hint} Valid keys {where}: "
                f"{', '.join(sorted(options)) or '(none: not a mapping)'}"
            )
        out[-1] = "++" + arg
    return out
