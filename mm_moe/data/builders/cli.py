"""`key=value` arguments for the builder jobs, validated against a dataclass.

The jobs take Hydra-style overrides (`input=DIR output=OUT overwrite=true`) without Hydra's run
directories; a wrong key or value fails naming it, like the training entry point.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from omegaconf import OmegaConf

from mm_moe.config.validate import ConfigError, _type_name, from_dict


def usage(cls: type, prog: str) -> str:
    hints = typing.get_type_hints(cls)
    lines = [f"usage: python data_pipelines/{prog} key=value ...", "keys:"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"(default: {f.default!r})"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"(default: {dataclasses.asdict(f.default_factory())})"
        else:
            default = "(required)"
        lines.append(f"  {f.name}: {_type_name(hints[f.name])} {default}")
    return "\n".join(lines)


def parse(cls: type, argv: list[str], prog: str):
    """The dataclass for `argv`, or exit 2 with a message naming the bad key."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage(cls, prog))
        sys.exit(0)
    bad = [a for a in argv if "=" not in a]
    try:
        if bad:
            raise ConfigError(f"arguments must be key=value, got {bad[0]!r}")
        values = OmegaConf.to_container(OmegaConf.from_dotlist(argv), resolve=True)
        return from_dict(cls, values)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}\n{usage(cls, prog)}", file=sys.stderr)
        sys.exit(2)
