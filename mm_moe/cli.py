"""What every command-line entry point shares: where the configs are, and how a failure is
reported (exit status 2 for the user's mistakes, 1 with a traceback for everything else).

`configs/` lives at the top of the repository; a wheel ships a copy inside the package
(`mm_moe/configs`, copied by setup.py's build step), so a non-editable install finds its
configs from any working directory.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from mm_moe.errors import UserError

_PACKAGE = Path(__file__).resolve().parent


def _config_dir() -> str:
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(
        f"mm_moe's configs are neither in {_PACKAGE / 'configs'} (an installed wheel) nor in "
        f"{_PACKAGE.parent / 'configs'} (a source checkout): reinstall mm_moe"
    )


CONFIG_DIR = _config_dir()


def failure(prog: str, exc: BaseException) -> int:
    """Print why `prog` stopped and return its exit status: 2 for a UserError (configuration
    or input: the message alone), 1 for anything else (with its traceback, unless the
    exception's own message says it all: `brief = True`). Secrets are masked."""
    from mm_moe.trainer.scrub import scrub_text

    if isinstance(exc, UserError):
        text, code = str(exc), 2
    elif getattr(exc, "brief", False):
        text, code = f"{exc.__class__.__name__}: {exc}", 1
    else:
        text, code = "".join(traceback.format_exception(exc)).rstrip(), 1
    print(f"{prog}: error: {scrub_text(text)}", file=sys.stderr)
    return code
