"""What every command-line entry point shares: where the configs are, composing and validating
them, `key=value` arguments with `--help`, and how a failure is reported (exit status 2 for
the user's mistakes with the message alone, 1 with a traceback for everything else).

`configs/` lives at the top of the repository; a wheel ships a copy inside the package
(`mm_moe/configs`, copied by setup.py's build step), so a non-editable install finds its
configs from any working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import traceback
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from mm_moe.config.overlay import check_config_dir
from mm_moe.config.overrides import check_overrides, check_syntax, command_line, options_first
from mm_moe.config.schema import GROUPS, TrainConfig
from mm_moe.config.validate import ConfigError, from_dict, type_name
from mm_moe.errors import UserError

_PACKAGE = Path(__file__).resolve().parent
# The config groups of configs/train.yaml that a command line may choose.
ENTRY_GROUPS = (*GROUPS, "experiment")


def _config_dir() -> str:
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(
        f"mm_moe's configs are neither in {_PACKAGE / 'configs'} (an installed wheel) nor in "
        f"{_PACKAGE.parent / 'configs'} (a source checkout): reinstall mm_moe"
    )


CONFIG_DIR = _config_dir()


# ---- failures ----
def _is_hydra_user_error(exc: BaseException) -> bool:
    """Hydra's own errors (a missing config group option, a bad --config-dir, a composition
    error) are the user's mistakes."""
    if "hydra" not in sys.modules:
        return False
    from hydra.errors import HydraException

    return isinstance(exc, HydraException)


def _is_yaml_error(exc: BaseException) -> bool:
    """A YAML syntax error while Hydra composes the config (a config file the user wrote):
    omegaconf lets PyYAML's error through, with the file and line it names."""
    yaml = sys.modules.get("yaml")
    return yaml is not None and isinstance(exc, yaml.YAMLError)


def failure(prog: str, exc: BaseException) -> int:
    """Print why `prog` stopped and return its exit status: 2 for a UserError or a Hydra
    error (configuration or input: the message alone), 1 for anything else (with its
    traceback, unless the exception's own message says it all: `brief = True`). Secrets are
    masked."""
    from mm_moe.utils.scrub import scrub_text

    if isinstance(exc, UserError) or _is_hydra_user_error(exc):
        text, code = _hydra_brief(str(exc).strip()), 2
    elif _is_yaml_error(exc):  # a config file a user wrote (its path and line are in it)
        text, code = f"a YAML file cannot be read: {' '.join(str(exc).split())}", 2
    elif getattr(exc, "brief", False):
        text, code = f"{exc.__class__.__name__}: {exc}", 1
    else:
        text, code = "".join(traceback.format_exception(exc)).rstrip(), 1
    print(f"{prog}: error: {scrub_text(text)}", file=sys.stderr)
    return code


def _hydra_brief(text: str) -> str:
    """A missing group option in one line with its choices (Hydra lists them one per line,
    then its config search path, which says nothing to a user)."""
    head, sep, options = text.partition("\n\nAvailable options in ")
    if not sep:
        return text
    group, _, rest = options.partition(":")
    names = [line.strip() for line in rest.split("Config search path:")[0].splitlines()]
    return f"{head}; {group.strip(chr(39))} options: {', '.join(n for n in names if n)}"


def _scrubbing_excepthook(exc_type, exc, tb) -> None:
    """What escapes every handler (MM_MOE_TRACEBACK=1 included) prints with secrets masked."""
    from mm_moe.utils.scrub import scrub_text

    text = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(scrub_text(text))


@contextlib.contextmanager
def exits_on_failure(prog: str, interrupted: str = "") -> Iterator[None]:
    """Run the body; an exception ends the process with `failure`'s status, Ctrl-C with one
    line (and `interrupted`, what to do next) and status 130 (MM_MOE_TRACEBACK=1 lets either
    propagate, for debugging; still printed with secrets masked)."""
    sys.excepthook = _scrubbing_excepthook
    try:
        yield
    except KeyboardInterrupt:
        if os.environ.get("MM_MOE_TRACEBACK"):
            raise
        if _launched_rank() == 0:  # Ctrl-C reaches every rank: one line, not N
            print(
                f"{prog}: interrupted (Ctrl-C){'; ' + interrupted if interrupted else ''}",
                file=sys.stderr,
            )
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - reported by failure(), secrets masked
        if os.environ.get("MM_MOE_TRACEBACK"):
            raise
        sys.exit(failure(prog, exc))


@contextlib.contextmanager
def hydra_errors(prog: str) -> Iterator[None]:
    """Run a `@hydra.main` entry point so that Hydra's errors reach `failure` (exit 2, one
    message, secrets masked) instead of Hydra's own handler (exit 1, printed raw): Hydra
    re-raises under HYDRA_FULL_ERROR."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with exits_on_failure(prog):
            yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    """Print `message` (secrets masked) and exit with `code`."""
    from mm_moe.utils.scrub import scrub_text

    print(f"{prog}: error: {scrub_text(message)}", file=sys.stderr)
    sys.exit(code)


def _launched_rank() -> int:
    """This process's rank as the launcher (torchrun, Slurm via adopt_slurm_env) set it."""
    return int(os.environ.get("RANK", 0))


def setup_logging(level: str = "INFO", fmt: str = "%(message)s") -> None:
    logging.basicConfig(
        level=getattr(logging, level) if _launched_rank() == 0 else logging.WARNING,
        format=fmt,
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # DeepSpeed's op builders log each compiler probe (`gcc ... -laio`) at INFO on every start.
    logging.getLogger("compilers").setLevel(logging.WARNING)
    from mm_moe.utils.scrub import install_log_scrubber

    install_log_scrubber()  # secrets masked in every log line, from the first


# ---- Hydra configs ----
def build_config(cfg, schema: type = TrainConfig) -> Any:
    """The one place a composed DictConfig becomes dataclasses."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return from_dict(schema, container)


def compose(
    overrides: list[str],
    config_name: str = "train",
    schema: type | None = TrainConfig,
    config_dir: str | None = None,
):
    """configs/<config_name>.yaml with `overrides`, validated against `schema` (keys are
    checked before Hydra sees them, so a typo names the key and what is valid); with
    `schema=None`, the resolved plain dict. `config_dir`: the user's own config folder, or a
    checkpoint's (its overlay checked as the training command checks it), searched first, as
    Hydra's --config-dir is."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if config_dir:
        check_config_dir(config_dir, list(overrides), config_name, CONFIG_DIR)
    if config_name == "train":
        overrides = check_overrides(list(overrides), TrainConfig, ENTRY_GROUPS)
    if config_dir:
        overrides = [*overrides, f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"]
    if GlobalHydra.instance().is_initialized():  # composed again in one process
        GlobalHydra.instance().clear()
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = hydra_compose(config_name, overrides=list(overrides))
    except HydraException as exc:  # a malformed override or a missing group option
        raise ConfigError(f"{exc} (overrides: {' '.join(overrides)})") from None
    if schema is None:
        return OmegaConf.to_container(cfg, resolve=True)
    return build_config(cfg, schema)


def check_command_line(argv: list[str]) -> None:
    """Before Hydra reads anything: every override parses (one-line ConfigError otherwise)
    and a checkpoint folder given as --config-dir brings only a safe overlay
    (mm_moe/config/overlay.py)."""
    args = command_line(argv)
    check_syntax(args.overrides)
    check_config_dir(args.config_dir, args.overrides, args.config_name, CONFIG_DIR)


def hydra_entry(prog: str, config_name: str, schema: type, run: Callable[[Any], None]) -> None:
    """An entry point over configs/<config_name>.yaml with Hydra's command line (overrides,
    --help, multirun): validates against `schema`, then runs."""
    import hydra

    @hydra.main(version_base=None, config_path=CONFIG_DIR, config_name=config_name)
    def _main(cfg) -> None:
        setup_logging()
        with exits_on_failure(prog):
            run(build_config(cfg, schema))

    from mm_moe.utils.sweep_secrets import scrub_sweep_config

    with hydra_errors(prog):
        sys.argv[1:] = options_first(sys.argv[1:])
        check_command_line(sys.argv[1:])
        # its own keys only (no config groups): an unknown key is named, with a did-you-mean
        sys.argv[1:] = check_overrides(sys.argv[1:], schema, ())
        try:
            _main()
        finally:
            scrub_sweep_config()


# ---- key=value arguments (jobs without Hydra's run directories) ----
def usage(cls: type, prog: str) -> str:
    hints = typing.get_type_hints(cls)
    lines = [f"usage: {prog} key=value ...", "keys:"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"(default: {f.default!r})"
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            shown = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            default = f"(default: {shown})"
        else:
            default = "(required)"
        lines.append(f"  {f.name}: {type_name(hints[f.name])} {default}")
    return "\n".join(lines)


def parse_args(cls: type, argv: list[str], prog: str):
    """The dataclass for `key=value` arguments; `--help` prints the keys; a wrong key or value
    exits 2 naming it."""
    from omegaconf import OmegaConf

    if any(a in ("-h", "--help") for a in argv):
        print(usage(cls, prog))
        sys.exit(0)
    bad = [a for a in argv if "=" not in a]
    try:
        if bad:
            raise ConfigError(f"arguments must be key=value, got {bad[0]!r}")
        try:
            dotlist = OmegaConf.from_dotlist(argv)
        except Exception as exc:  # noqa: BLE001 - YAML's and OmegaConf's parse errors
            raise _unreadable(argv) from exc
        return from_dict(cls, OmegaConf.to_container(dotlist, resolve=True))
    except ConfigError as exc:
        fail(prog, f"{exc}\n{usage(cls, prog)}")


def _unreadable(argv: list[str]) -> ConfigError:
    """The error naming the argument YAML cannot read (glob=*.txt reads as an alias)."""
    from omegaconf import OmegaConf

    for arg in argv:
        try:
            OmegaConf.from_dotlist([arg])
        except Exception as exc:  # noqa: BLE001 - YAML's and OmegaConf's parse errors
            first = str(exc).splitlines()[0]
            return ConfigError(
                f"cannot read {arg!r} ({first}); quote the value, e.g. 'glob=\"*.txt\"'"
            )
    return ConfigError(f"cannot read the arguments {argv}")


def run_job(prog: str, cls: type, job: Callable[[Any], Any], argv: list[str] | None = None):
    """A `key=value` job: parse into `cls`, run `job(cfg)`, report failures; returns what
    the job returned."""
    setup_logging(fmt="%(levelname)s %(message)s")
    cfg = parse_args(cls, sys.argv[1:] if argv is None else argv, prog)
    with exits_on_failure(prog):
        return job(cfg)
