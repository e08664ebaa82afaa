"""Upcycling entry point: `python -m mm_moe.upcycle source=PATH source_format=native|hf out=PATH
[upcycle options] [training-config overrides]`.

Arguments use Hydra's override grammar (`untie=[attention,norms]`,
`moe.experts_per_modality.text=4`, `moe=moma_4t4i_tc`). Keys of `configs/upcycle.yaml` are the
upcycling options (schema: UpcycleConfig); every other key is a training-config key, checked
against the same schemas training uses. The target config starts from the source's own
config.yaml (native) or from configs/train.yaml's defaults with the architecture of the
Hugging Face config.json (hf); group choices replace a group, then dotted keys apply.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import yaml

from mm_moe.cli import CONFIG_DIR, ENTRY_GROUPS, compose, exits_on_failure, setup_logging, usage
from mm_moe.config import ConfigError, TrainConfig, from_dict
from mm_moe.config.legacy import upgrade_saved_config
from mm_moe.config.overrides import check_overrides, command_line, options_first
from mm_moe.config.validate import did_you_mean, valid_keys
from mm_moe.upcycle.config import UpcycleConfig

PROG = "mm_moe.upcycle"
DELETE = object()  # a `~key` override's value: the key goes
log = logging.getLogger("mm_moe")


def split_args(argv: list[str]) -> tuple[dict, list[str], list[tuple[str, object]]]:
    """(upcycle options, group choices as `group=name`, dotted training overrides)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(argv)
    except HydraException as exc:
        raise ConfigError(str(exc)) from exc
    upcycle_keys = valid_keys(UpcycleConfig, [])
    options, choices, train = {}, [], []
    for arg, o in zip(argv, parsed):
        key = o.key_or_group
        if o.is_delete() and "=" in arg:
            raise ConfigError(f"{arg!r}: a deletion takes the key alone: ~{key}")
        if o.is_delete() and "." in key and key not in upcycle_keys:
            _check_used(arg, key.split(".", 1)[0])
            train.append((key, DELETE))  # as training takes it: ~moe.experts_per_modality.mixed
            continue
        if o.is_delete() or o.package or o.is_sweep_override():
            raise ConfigError(
                f"{arg!r}: only key=value (and ~key deletion) overrides are taken here"
            )
        if key in upcycle_keys:
            options[key] = o.value()
        elif key in ENTRY_GROUPS and isinstance(o.value(), str):
            _check_used(arg, key)
            choices.append(f"{key}={o.value()}")
        elif "." in key or key in valid_keys(TrainConfig, []):
            check_overrides([arg.lstrip("+")], TrainConfig, ENTRY_GROUPS)
            _check_used(arg, key.split(".", 1)[0])
            train.append((key, o.value()))
        else:
            options_all = sorted({*upcycle_keys, *USED_GROUPS})
            raise ConfigError(
                f"unknown key '{key}'.{did_you_mean(key, options_all)} Upcycling options: "
                f"{', '.join(sorted(upcycle_keys))}; or a key or group choice of the target's "
                f"{', '.join(USED_GROUPS[:-1])} (dotted: moe.top_k=2), or experiment=..."
            )
    return options, choices, train


# The training-config groups the upcycle reads: the target's architecture (model, moe), and its
# vocabulary (tokenizer, data); `experiment` chooses a Hugging Face source's base.
USED_GROUPS = ("model", "moe", "tokenizer", "data", "experiment")


def _check_used(arg: str, group: str) -> None:
    """A training key the upcycle never reads (trainer.max_steps, optim.lr, name, ...) is
    refused: it would be written to config.yaml and change nothing, not even the training that
    starts from the result (`experiment=upcycled` brings only model, moe and tokenizer)."""
    if group not in USED_GROUPS:
        raise ConfigError(
            f"{arg!r}: the upcycle does not use '{group}' (it reads only "
            f"{', '.join(g + '.*' for g in USED_GROUPS[:-1])} and the group choices "
            f"{', '.join(g + '=...' for g in USED_GROUPS)}); give training keys to mm_moe.train "
            "when you train the result: --config-dir OUT experiment=upcycled checkpoint.resume=OUT"
        )


def target_config(
    ucfg: UpcycleConfig, choices: list[str], train: list, config_dir: str | None = None
) -> TrainConfig:
    """The target's training config: the base (see module doc), group choices, overrides."""
    from omegaconf import OmegaConf

    from mm_moe.checkpoint.layout import read_config
    from mm_moe.checkpoint.pretrained import find_step_dir
    from mm_moe.upcycle import hf_import, recorded_vocab

    if ucfg.source_format == "hf":
        base = compose(choices, schema=None, config_dir=config_dir)
        fields = hf_import.model_fields(hf_import.read_config(ucfg.source), ucfg.source)
        base["model"].update(fields)
        if not any(c.startswith("tokenizer=") for c in choices):  # an mm_moe export's
            base["tokenizer"].update(recorded_vocab.tokenizer_fields(ucfg.source))
    else:
        step_dir = find_step_dir(ucfg.source)
        base = upgrade_saved_config(read_config(step_dir))
        source_tokenizer = dict(base.get("tokenizer") or {})  # before group choices replace it
        if any(c.startswith("experiment=") for c in choices):
            raise ConfigError(
                "experiment=... applies to source_format=hf only; with a native source the "
                "target starts from the source's config: give model.* / moe.* keys or groups"
            )
        if choices:
            composed = compose(choices, schema=None, config_dir=config_dir)
            for choice in choices:
                group = choice.split("=", 1)[0]
                base[group] = composed[group]
    conf = OmegaConf.create(base)
    for key, value in train:
        if value is DELETE:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(conf, parent)
            if not OmegaConf.is_dict(node) or leaf not in node:
                raise ConfigError(f"~{key}: the target's config has no {key} to delete")
            del node[leaf]
        else:
            OmegaConf.update(conf, key, value, merge=False, force_add=True)
    if ucfg.untie is not None:
        given = dict(train).get("model.untie")
        if given is not None and given is not DELETE and sorted(given) != sorted(ucfg.untie):
            raise ConfigError(f"untie={ucfg.untie} and model.untie={given} disagree")
        conf.model.untie = list(ucfg.untie)
    container = OmegaConf.to_container(conf, resolve=True)
    container["checkpoint"]["resume"] = "none"
    if ucfg.source_format != "hf":
        _check_tokenizer_is_used(source_tokenizer, container)
    else:
        _check_sequence_fits(ucfg.source, container)
    return from_dict(TrainConfig, container)


def _check_sequence_fits(source: str, target: dict) -> None:
    """The source's max_position_embeddings bounds the target's sequences: named as such, not
    as a model.max_seq_len the user never set."""
    seq_len, limit = target["data"]["seq_len"], target["model"]["max_seq_len"]
    if seq_len > limit:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds the source's max_position_embeddings={limit} "
            f"({source}/config.json, the target's model.max_seq_len): pass data.seq_len={limit} "
            "or less"
        )


def _check_tokenizer_is_used(source_tok: dict, target: dict) -> None:
    """A tokenizer change the target's vocabulary cannot see is refused: synthetic data makes
    its vocabulary without a tokenizer, so the model would keep the source's ids while its
    config names a tokenizer of another vocabulary (training on real shards then fails)."""
    changed = {
        k: v
        for k, v in target.get("tokenizer", {}).items()
        if k != "allow_changed" and k in source_tok and source_tok[k] != v
    }
    source = target.get("data", {}).get("source")
    if changed and source == "synthetic_patterns":
        given = ", ".join(
            f"tokenizer.{k}={v} (the source's {source_tok[k]})" for k, v in changed.items()
        )
        raise ConfigError(
            f"{given}: data.source=synthetic_patterns makes the vocabulary without a tokenizer, "
            "so the upcycled model would keep the source's vocabulary while its config names "
            "another tokenizer. Give the shards the target will train on (data.source=webdataset "
            "data.sources=[...]) to size the vocabulary for that tokenizer, or keep the source's "
            "tokenizer"
        )


def run(argv: list[str]) -> int:
    from mm_moe.upcycle import upcycling
    from mm_moe.upcycle.verify import verify

    # Hydra's flags as training takes them: --config-dir DIR with the user's own presets
    args = command_line(options_first(argv))
    others = [
        f for f in ("config_name", "config_path", "cfg", "info", "package") if getattr(args, f)
    ]
    if others or args.multirun or args.run:
        raise ConfigError(
            f"mm_moe.upcycle takes Hydra's --config-dir only (not {', '.join(others) or '-m/-r'})"
        )
    options, choices, train = split_args(args.overrides)
    defaults = yaml.safe_load((Path(CONFIG_DIR) / "upcycle.yaml").read_text())
    ucfg = from_dict(UpcycleConfig, {**defaults, **options})
    target = target_config(ucfg, choices, train, args.config_dir)
    source_cfg, source_state = upcycling.load_source(ucfg.source, ucfg.source_format)
    vq_dir = target.tokenizer.path  # hf_layout points it at the output
    if ucfg.source_format == "hf":
        vocab = upcycling.hf_layout(ucfg, target)
    else:
        vocab = upcycling.data_vocab(target)
    upcycling.resolve_target(target, source_cfg, ucfg.source_format, vocab)
    out, fresh = upcycling.write(ucfg, target, source_state, vocab, vq_dir)

    params = target.model.num_params(target.moe)
    groups = target.moe.experts_per_modality or "none (dense)"
    log.info(
        "upcycled %s (%s, %.2fM parameters) -> %s: %.2fM parameters, experts %s%s, untie %s, "
        "vocabulary %d -> %d",
        ucfg.source,
        ucfg.source_format,
        source_cfg.num_params()["total"] / 1e6,
        out,
        params["total"] / 1e6,
        groups,
        f" x granularity {target.moe.granularity}" if target.moe.granularity > 1 else "",
        target.model.untie or "none",
        source_cfg.vocab_size,
        target.model.vocab_size,
    )
    if fresh:
        # One entry per module kind: layers.*.ffn.aux_routers.text, not every tensor.
        modules = (re.sub(r"(\.net\.\d+)?\.(weight|bias)$", "", n) for n in fresh)
        patterns = dict.fromkeys(re.sub(r"^layers\.\d+\.", "layers.*.", n) for n in modules)
        log.info("freshly initialized (no dense counterpart): %s", ", ".join(patterns))
    log.info(
        "train it: python -m mm_moe.train --config-dir %s experiment=upcycled checkpoint.resume=%s",
        out,
        out,
    )
    _say_exportable(target, vocab)
    if not ucfg.verify:
        return 0
    result = verify(ucfg, target, source_cfg, vocab)
    for line in result.lines():
        print(line, flush=True)
    return 1 if result.status == "FAILED" else 0


def _say_exportable(target: TrainConfig, vocab) -> None:
    """Whether mm_moe.export can write the result back as a Hugging Face model, said now: a
    user who upcycles to train and export back learns before training, not after it."""
    from types import SimpleNamespace

    from mm_moe.errors import UserError
    from mm_moe.upcycle.hf_export import architecture

    model = SimpleNamespace(cfg=target.model, moe_cfg=target.moe, vocab=vocab)
    try:
        log.info(
            "mm_moe.export writes it (trained or not) as a Hugging Face %s", architecture(model)
        )
    except UserError as exc:
        log.info("mm_moe.export cannot write it back: %s", str(exc).split(": ", 1)[1])


def main() -> None:
    setup_logging()
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__.strip() + "\n\n" + usage(UpcycleConfig, PROG))
        print("  ... and any training-config key (model.*, moe.*, tokenizer.*, data.*)")
        sys.exit(0)
    with exits_on_failure(PROG):
        code = run(sys.argv[1:])
    sys.exit(code)


if __name__ == "__main__":
    main()
