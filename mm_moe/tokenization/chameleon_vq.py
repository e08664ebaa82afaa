"""Chameleon's image tokenizer (`tokenizer.image=chameleon`): the source model's VQGAN, run with
transformers' `ChameleonVQVAE` (its encoder and quantizer; the decoder weights were never
published, so codes cannot be turned back into pixels).

Preprocessing is Chameleon's: alpha composited over white (this project's `to_rgb`), then
transformers' Chameleon image processor: the shorter side resized to the VQ resolution
(Lanczos), the centre square cropped, values rescaled to about [-1, 1].

`tokenizer.path` is either a Chameleon folder (config.json with `vq_config`, the weights under
`model.vqmodel.*`) or the pair of files the upcycling import extracts from one:
`chameleon_vq.json` (the VQ config) and `chameleon_vq.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mm_moe.errors import UserError
from mm_moe.tokenization.image_preprocess import to_rgb
from mm_moe.utils.json_files import read_json_object

VQ_CONFIG, VQ_WEIGHTS = "chameleon_vq.json", "chameleon_vq.safetensors"
PREFIX = "model.vqmodel."


def _source(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(VQ config, VQ weights without prefix) from either folder layout."""
    from safetensors.torch import load_file

    if (folder / VQ_CONFIG).is_file():
        vq_config = read_json_object(folder / VQ_CONFIG, "Chameleon's VQGAN configuration")
        return vq_config, load_file(str(folder / VQ_WEIGHTS))
    config = folder / "config.json"
    what = "a Chameleon model's configuration"
    if not config.is_file() or read_json_object(config, what).get("model_type") != "chameleon":
        raise UserError(
            f"tokenizer.path={folder}: tokenizer.image=chameleon needs {VQ_CONFIG} and "
            f"{VQ_WEIGHTS}, or a Chameleon folder (config.json with model_type chameleon)"
        )
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(
            {k[len(PREFIX) :]: v for k, v in load_file(str(shard)).items() if k.startswith(PREFIX)}
        )
    return read_json_object(config, what)["vq_config"], weights


def extract(folder: str | Path, out: str | Path) -> None:
    """Write `chameleon_vq.json` and `chameleon_vq.safetensors` of a Chameleon folder to `out`."""
    from safetensors.torch import save_file

    config, weights = _source(Path(folder))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / VQ_CONFIG).write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / VQ_WEIGHTS))


class ChameleonVQTokenizer:
    def __init__(self, folder: str | Path):
        from transformers import ChameleonVQVAEConfig

        # The processor on PIL and numpy (transformers >= 5.4; the default one needs torchvision).
        from transformers.models.chameleon.image_processing_pil_chameleon import (
            ChameleonImageProcessorPil,
        )
        from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

        config, weights = _source(Path(folder))
        config = {
            k: v for k, v in config.items() if k not in ("model_type", "transformers_version")
        }
        vq_config = ChameleonVQVAEConfig(**config)
        self.vq = ChameleonVQVAE(vq_config).eval()
        missing, unexpected = self.vq.load_state_dict(weights, strict=False)
        needed = [n for n in missing if not n.startswith(("decoder.", "post_quant_conv."))]
        if needed or unexpected:
            raise UserError(
                f"tokenizer.path={folder}: the VQ weights do not match its config: missing "
                f"{needed[:5]}, unexpected {unexpected[:5]}"
            )
        res = vq_config.resolution
        self.processor = ChameleonImageProcessorPil(
            size={"shortest_edge": res}, crop_size={"height": res, "width": res}
        )
        self.codebook_size = vq_config.num_embeddings
        side = res // 2 ** (len(vq_config.channel_multiplier) - 1)
        self.tokens_per_image = side * side

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """[1, 3, R, R]: the image as Chameleon's VQ takes it."""
        return self.processor(to_rgb(image), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode(self, image: Image.Image) -> np.ndarray:
        codes = self.vq.encode(self.pixel_values(image), return_dict=True).image_tokens
        return codes.reshape(-1).numpy().astype(np.int64)

    can_decode = False  # the published VQGAN holds the encoder only

    def decode(self, codes: np.ndarray) -> Image.Image:
        raise UserError(
            "tokenizer.image=chameleon cannot decode image codes: Chameleon's VQGAN decoder "
            "weights were never published (generate text, or use a VQ with a decoder)"
        )
