"""Print total and active parameters and training FLOPs per token of every model preset.

    .venv/bin/python scripts/model_size.py [PRESET ...] [--seq-len N]

Presets are configs/model/*.yaml (some select an MoE config too); counts are analytic
(tests check them against built models). A preset whose vocabulary comes from the data
(vocab_size 0, the tiny ones) is counted with the default data's, as `mm_moe.train
model=PRESET` would build it. For a config of your own (overrides, --config-dir), `python -m
mm_moe.plan` prints the same counts with the memory plan.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir

from mm_moe.train import CONFIG_DIR, build_config
from mm_moe.utils import units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="names in configs/model (default: all)")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    known = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
    names = args.presets or known
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown preset(s) {unknown}: configs/model holds {', '.join(known)}")
    if args.seq_len < 1:
        parser.error(f"--seq-len={args.seq_len} must be >= 1")
    print(
        f"{'preset':<22}{'total':>10}{'active text':>13}{'active image':>14}"
        f"{'GFLOPs/tok text':>17}{'image':>8}  (training, seq {args.seq_len})"
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        for name in names:
            cfg = build_config(compose("train", overrides=[f"model={name}"]))
            model = cfg.model
            if not model.vocab_size:
                model = model.with_vocab(cfg.data.vocab(cfg.tokenizer).size)
            params = model.num_params(cfg.moe)
            flops = model.flops_per_token(args.seq_len, cfg.moe)
            print(
                f"{name:<22}{units.count(params['total']):>10}"
                f"{units.count(params['active']['text']):>13}"
                f"{units.count(params['active']['image']):>14}"
                f"{flops['text'] / 1e9:>17.3g}{flops['image'] / 1e9:>8.3g}"
            )


if __name__ == "__main__":
    main()
