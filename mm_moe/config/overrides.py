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


def check_overrides(argv: list[str], schema: type, groups: tuple[str, ...]) -> list[str]:
    """Raise ConfigError for an override whose key is not in `schema`.

    Returns argv with every checked key override in Hydra's `++key=value` form (add or
    override), so a schema key that a preset's YAML leaves out can still be set."""
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
            where = f"under '{'.'.join(parents)}'" if parents else "at the top level"
            hint = did_you_mean(leaf, options)
            raise ConfigError(
                f"unknown config key '{key}'.{hint} Valid keys {where}: "
                f"{', '.join(sorted(options)) or '(none: not a mapping)'}"
            )
        out[-1] = "++" + arg
    return out
