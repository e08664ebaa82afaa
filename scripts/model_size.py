"""Print parameters and training FLOPs per token of every model preset (or the given ones).

.venv/bin/python scripts/model_size.py [PRESET ...] [--seq-len N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from mm_moe.config import from_dict
from mm_moe.model.config import ModelConfig

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="names in configs/model (default: all)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=65536 + 5 + 8192,
        help="for presets with vocab_size 0 (taken from the data)",
    )
    args = parser.parse_args()
    names = args.presets or sorted(p.stem for p in PRESETS.glob("*.yaml"))
    print(f"{'preset':<16}{'total':>12}{'embedding':>12}{'FLOPs/token':>14}  (seq {args.seq_len})")
    for name in names:
        cfg = from_dict(
            ModelConfig, yaml.safe_load((PRESETS / f"{name}.yaml").read_text()), prefix="model"
        )
        cfg = cfg.with_vocab(args.vocab_size)
        params = cfg.num_params()
        flops = cfg.flops_per_token(args.seq_len)["text"]
        print(
            f"{name:<16}{params['total'] / 1e6:>11.1f}M{params['embedding'] / 1e6:>11.1f}M"
            f"{flops:>14.3g}"
        )


if __name__ == "__main__":
    main()
