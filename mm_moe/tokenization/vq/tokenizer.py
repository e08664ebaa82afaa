"""The trained VQ image tokenizer behind the ImageTokenizer interface, and its artifacts.

tokenizers/<name>/vq.pt        model weights (tensors only: loads with weights_only=True)
tokenizers/<name>/vq.yaml      the VQConfig it was built with
tokenizers/<name>/metrics.json held-out PSNR and codebook usage, measured after training
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from mm_moe.errors import UserError
from mm_moe.tokenization.config import VQConfig
from mm_moe.tokenization.image_preprocess import preprocess
from mm_moe.tokenization.vq.model import VQVAE

WEIGHTS, CONFIG, METRICS = "vq.pt", "vq.yaml", "metrics.json"


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """[3, R, R] in [-1, 1], by the project's preprocessing policy."""
    rgb = np.asarray(preprocess(image, resolution), dtype=np.float32)
    return torch.from_numpy(rgb).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_image(x_CHW: torch.Tensor) -> Image.Image:
    rgb = ((x_CHW.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(rgb)


def save(model: VQVAE, out_dir: Path, metrics: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / WEIGHTS)
    (out_dir / CONFIG).write_text(yaml.safe_dump(asdict(model.cfg), sort_keys=False))
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=1))


def _first_line(exc: Exception) -> str:
    if isinstance(exc, pickle.UnpicklingError):  # its text advises loading code: never done
        return "UnpicklingError: not tensors torch.save wrote"
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def load_model(path: str | Path) -> VQVAE:
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise UserError(
            f"no VQ tokenizer in {path} (expected {WEIGHTS} and {CONFIG}): set "
            "tokenizer.path to the folder that holds them (the demo's, tokenizers/demo, is "
            "built by `make train`), or train one with `python -m mm_moe.tokenization.train_image`"
        )
    damaged = (
        f"the VQ tokenizer in {path} is damaged or its {WEIGHTS} and {CONFIG} do not belong "
        "together (an interrupted copy, or files of two VQs): copy both again from where it "
        "was trained, or train it again"
    )
    try:
        fields = yaml.safe_load((path / CONFIG).read_text())
        model = VQVAE(VQConfig(**fields))
    except UserError as exc:  # values out of range: the config's own message
        raise UserError(f"{path / CONFIG}: {exc}") from None
    except (yaml.YAMLError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path / CONFIG}: {_first_line(exc)}; {damaged}") from None
    try:
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, AttributeError) as exc:
        raise UserError(f"{path / WEIGHTS}: {_first_line(exc)}; {damaged}") from None
    return model.eval()


class VQImageTokenizer:
    def __init__(self, path: str | Path):
        self.model = load_model(path)
        self.codebook_size = self.model.cfg.codebook_size
        self.tokens_per_image = self.model.cfg.tokens_per_image
        self.resolution = self.model.cfg.resolution

    def encode(self, image: Image.Image) -> np.ndarray:
        x = image_to_tensor(image, self.resolution).unsqueeze(0)
        return self.model.encode(x)[0].numpy()

    def encode_batch(self, images: list[Image.Image]) -> np.ndarray:
        x = torch.stack([image_to_tensor(im, self.resolution) for im in images])
        return self.model.encode(x).numpy()

    def decode(self, codes: np.ndarray) -> Image.Image:
        return self.decode_batch([codes])[0]

    def decode_batch(self, codes: list[np.ndarray]) -> list[Image.Image]:
        lengths = {int(np.asarray(c).size) for c in codes}
        if lengths != {self.tokens_per_image}:
            raise UserError(f"expected {self.tokens_per_image} codes per image, got {lengths}")
        codes_BT = torch.as_tensor(np.stack([np.asarray(c).reshape(-1) for c in codes]))
        return [tensor_to_image(x_CHW) for x_CHW in self.model.decode(codes_BT.long())]
