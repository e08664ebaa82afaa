"""Sample text, images or both from a trained checkpoint.

    python -m mm_moe.generate checkpoint=runs/demo prompt="a handwritten digit 7"
    python -m mm_moe.generate checkpoint=runs/demo image=digit.png mode=text   # a caption

mode=image continues `prompt` with an image (decoded to PNG by the VQ decoder, or saved as its
codes, `.codes.npy`, where the image tokenizer has no decoder: Chameleon's), mode=text with
text, mode=auto lets the model choose. Images go to `out` (default: `samples/` in the run folder
the checkpoint sits in, <run>/checkpoints/step_N; beside a step folder that sits elsewhere;
inside a checkpoint folder a user named, such as an upcycle's OUT).
With mode=image, `guidance` > 1 samples with classifier-free guidance (the demo report's
text->image uses 3 at temperature 0.7: docs/evaluation.md); the n samples are drawn together.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from mm_moe.cli import exits_on_failure, parse_args
from mm_moe.data.decode import size_problem
from mm_moe.errors import UserError
from mm_moe.sampling import SampleConfig, generate, split_output

log = logging.getLogger("mm_moe")

PROG = "mm_moe.generate"


@dataclass
class GenerateTokenizer:
    # The tokenizer folder, where it is no longer where the checkpoint's config says (moved);
    # empty: the checkpoint's tokenizer.path.
    path: str = ""
    # The vocabulary layout file (vocab.yaml) where the checkpoint's tokenizer.vocab has moved;
    # empty: the checkpoint's, else the copy in its step folder.
    vocab: str = ""
    # Use a tokenizer whose files changed since the checkpoint was made (refused otherwise).
    allow_changed: bool = False


@dataclass
class GenerateConfig:
    checkpoint: str
    prompt: str | None = ""
    # An image to put in the prompt (after the text), e.g. to caption it with mode=text.
    image: str | None = ""
    mode: Literal["auto", "text", "image"] = "auto"
    n: int = 1
    out: str = ""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    # Nucleus sampling: among the most likely tokens whose probabilities sum to top_p (1: all).
    top_p: float = 1.0
    seed: int = 0
    # Classifier-free guidance scale for mode=image (1: none).
    guidance: float = 1.0
    tokenizer: GenerateTokenizer = field(default_factory=GenerateTokenizer)

    def __post_init__(self) -> None:
        for key, value, least, meaning in (
            ("n", self.n, 1, "samples"),
            ("max_new_tokens", self.max_new_tokens, 1, "tokens to sample"),
            ("temperature", self.temperature, 0, "0: greedy"),
            ("top_k", self.top_k, 0, "0: every allowed token"),
        ):
            if not value >= least or not math.isfinite(value):  # nan compares False
                raise UserError(f"{key}={value} must be >= {least}, a finite number ({meaning})")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1] (1: every allowed token)")
        if not 1 <= self.guidance < math.inf:
            raise UserError(f"guidance={self.guidance} must be >= 1, a finite number (1: none)")
        if self.guidance != 1 and self.mode != "image":
            raise UserError(f"guidance={self.guidance} needs mode=image (got mode={self.mode})")
        default = GenerateConfig.__dataclass_fields__["max_new_tokens"].default
        if self.mode == "image" and self.max_new_tokens != default:
            raise UserError(
                f"max_new_tokens={self.max_new_tokens} has no effect with mode=image: an image "
                "is always its image tokenizer's fixed number of codes and end-of-image. Drop "
                "the key, or use mode=text or mode=auto"
            )
        if self.prompt is None:  # prompt=null: no prompt, as prompt=""
            self.prompt = ""


def prompt_ids(tok, text: str, image: Image.Image | None, mode: str) -> list[int]:
    vocab = tok.vocab
    ids = [vocab.bos] + (tok.text.encode(text) if text else [])  # None or "": no text
    if image is not None:
        codes = tok.image.encode(image)
        ids += [vocab.boi, *vocab.image_token_ids(codes).tolist(), vocab.eoi]
    if mode == "image":
        ids.append(vocab.boi)
    return ids


def open_image(path: str) -> Image.Image:
    """The prompt's image, decoded now: a file PIL cannot read is a UserError naming it."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(
            f"image={path} cannot be read as an image ({exc.__class__.__name__}: {exc}); give "
            "an image file Pillow reads (PNG, JPEG, WebP, ...)"
        ) from exc
    return image


def default_out(checkpoint: str, model) -> Path:
    """`samples/` where the checkpoint is now (not the run folder its config recorded, which
    may have moved or belong to another copy): <run>/samples for <run>/checkpoints/step_N,
    beside a step folder kept elsewhere, inside a checkpoint folder a user named (an upcycled
    model's: beside it, every model in that folder would share one); the recorded run
    folder for a model given without a path."""
    from mm_moe.checkpoint.layout import is_step_dir_name
    from mm_moe.checkpoint.pretrained import find_step_dir

    if not checkpoint:
        return Path(model.train_config.trainer.run_dir) / "samples"
    step_dir = find_step_dir(checkpoint).resolve()
    if step_dir.parent.name == "checkpoints":  # a run's checkpoint.dir default
        return step_dir.parent.parent / "samples"
    if not is_step_dir_name(step_dir.name):
        return step_dir / "samples"
    return step_dir.parent / "samples"


def _room_for(cfg: GenerateConfig, model, tok, prompt: list[int]) -> int:
    """The tokens to sample: max_new_tokens (an image's codes and eoi in mode=image), at most
    what model.max_seq_len leaves after the prompt (said, rather than found after sampling);
    a prompt that fills it, or leaves no room for mode=image's image, is refused."""
    wanted = cfg.max_new_tokens if cfg.mode != "image" else tok.image.tokens_per_image + 1
    room = model.cfg.max_seq_len - len(prompt)
    if room <= 0:
        raise UserError(
            f"the prompt ({len(prompt)} tokens) fills model.max_seq_len={model.cfg.max_seq_len}; "
            "shorten the prompt"
        )
    if wanted > room and cfg.mode == "image":
        raise UserError(
            f"the prompt ({len(prompt)} tokens) and an image ({tok.image.tokens_per_image} "
            f"codes and its end) exceed model.max_seq_len={model.cfg.max_seq_len}; shorten "
            "the prompt"
        )
    _say_if_untrained_positions(model, len(prompt) + min(wanted, room))
    if wanted > room:
        log.warning(
            "max_new_tokens=%d is more than the %d tokens model.max_seq_len=%d leaves after the "
            "%d-token prompt: sampling at most %d",
            wanted,
            room,
            model.cfg.max_seq_len,
            len(prompt),
            room,
        )
        return room
    return wanted


def stop_ids(tokenizer_cfg, vocab) -> frozenset[int]:
    """The end ids of a published model besides eos: its generation_config.json's eos list,
    which the upcycle keeps beside its tokenizer (Llama 3 ends a turn with <|eot_id|>)."""
    from mm_moe.upcycle.hf_import import GENERATION_CONFIG
    from mm_moe.utils.json_files import read_json_object

    path = Path(tokenizer_cfg.path) / GENERATION_CONFIG if tokenizer_cfg.path else None
    if path is None or not path.is_file():
        return frozenset()
    eos = read_json_object(path, "generation settings").get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return frozenset(i for i in ids if isinstance(i, int) and 0 <= i < vocab.size)


def _say_if_untrained_positions(model, length: int) -> None:
    """Positions past the rows the model trained on (data.seq_len) were never trained: what it
    samples there is said to be out of its training."""
    trained = model.train_config.data.seq_len
    if length > trained:
        log.warning(
            "the prompt and the tokens to sample reach position %d; the model trained on rows "
            "of data.seq_len=%d: positions past it were never trained",
            length,
            trained,
        )


def _say_if_training_skips(image: Image.Image, path: str, data_cfg) -> None:
    """A prompt image of a size the run's data keys skip (1x1, a long strip) is still
    tokenized, resized: the model saw none like it in training, so it is said."""
    if data_cfg.source == "synthetic_patterns":  # made its own images: nothing was skipped
        return
    problem = size_problem(*image.size, data_cfg.min_image_side, data_cfg.max_aspect_ratio)
    if problem is not None:
        log.warning(
            "image=%s is %dx%d, %s: training skipped images like it, so the model saw none "
            "like it; it is tokenized all the same",
            path,
            *image.size,
            problem[1],
        )


def _check_tokenizer_made_the_ids(model, tok, checkpoint) -> None:
    """The tokenizer must make the vocabulary the model was trained on (the one its checkpoint
    recorded): a run on the synthetic data records its tokenizer config but trains on the
    stand-in ids."""
    trained = getattr(model, "vocab", None)
    if trained is None or trained.size == tok.vocab.size:
        return
    source = model.train_config.data.source
    why = (
        f"it was trained with data.source={source}, which makes its own ids and does not use "
        "the tokenizer its config names"
        if source == "synthetic_patterns"
        else "its tokenizer has changed since"
    )
    raise UserError(
        f"{checkpoint}: the model was trained on a vocabulary of {trained.size} ids and its "
        f"tokenizer makes {tok.vocab.size} ({why}); sampling needs the tokenizer that made "
        "the training ids"
    )


def run(cfg: GenerateConfig, model=None, tokenizers=None) -> list[dict]:
    """One dict per sample: {"text": str, "images": [PNG paths]}."""
    from mm_moe.api import load_pretrained

    image = open_image(cfg.image) if cfg.image else None  # before the (slow) model load
    if model is None:
        overrides = {k: v for k, v in asdict(cfg.tokenizer).items() if v}
        model = load_pretrained(cfg.checkpoint, tokenizer=overrides)
    tok = tokenizers if tokenizers is not None else model.train_config.tokenizer.build()
    _check_tokenizer_made_the_ids(model, tok, cfg.checkpoint)
    if image is not None:
        _say_if_training_skips(image, cfg.image, model.train_config.data)
    prompt = prompt_ids(tok, cfg.prompt, image, cfg.mode)
    out_dir = Path(cfg.out) if cfg.out else default_out(cfg.checkpoint, model)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out={out_dir} is a file; it must be a folder (or not exist yet)")
    if cfg.guidance != 1:
        return _guided_images(cfg, model, tok, prompt, out_dir)
    results = []
    max_new = _room_for(cfg, model, tok, prompt)
    for i in range(cfg.n):
        sample_cfg = SampleConfig(max_new, cfg.temperature, cfg.top_k, cfg.seed + i, cfg.top_p)
        new = generate(
            model,
            tok.vocab,
            prompt,
            tok.image.tokens_per_image,
            sample_cfg,
            stop_after_image=cfg.mode == "image",
            stop_ids=stop_ids(model.train_config.tokenizer, tok.vocab),
        )
        text, images = [], []
        for kind, values in split_output(new, tok.vocab):
            if kind == "text":
                text.append(tok.text.decode(values))
            elif len(values) == tok.image.tokens_per_image:
                out_dir.mkdir(parents=True, exist_ok=True)
                images.append(
                    str(_save_image(tok.image, values, out_dir, cfg.seed + i, len(images)))
                )
            else:  # begun too late: max_new_tokens ended it
                log.warning(
                    "sample %d: an image begun %d tokens before the end has %d of its %d codes "
                    "and is left out; raise max_new_tokens",
                    i,
                    len(values) + 1,
                    len(values),
                    tok.image.tokens_per_image,
                )
        results.append({"text": "".join(text), "images": images})
    return results


def _guided_images(cfg: GenerateConfig, model, tok, prompt: list[int], out_dir: Path) -> list:
    from mm_moe.eval.text_to_image import sample_image_codes

    _room_for(cfg, model, tok, prompt)
    codes = sample_image_codes(
        model,
        tok,
        [prompt] * cfg.n,
        cfg.temperature,
        cfg.top_k,
        cfg.seed,
        cfg.guidance,
        top_p=cfg.top_p,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        {"text": "", "images": [str(_save_image(tok.image, c, out_dir, cfg.seed + i, 0))]}
        for i, c in enumerate(codes)
    ]


def _say_if_replaced(path: Path) -> None:
    """Samples are named by seed: another checkpoint's (or another prompt's) sample of the
    same seed in the same folder is replaced, which is said."""
    if path.exists():
        log.warning(
            "replacing %s (an earlier sample of the same seed): out=FOLDER keeps both", path
        )


def _save_image(image_tokenizer, codes, out_dir: Path, seed: int, index: int) -> Path:
    """The image as a PNG, or its codes as .npy where the tokenizer has no decoder (Chameleon's
    VQGAN: published without one) to decode with the original release's decoder."""
    stem = out_dir / f"sample_{seed:03d}_{index}"
    if getattr(image_tokenizer, "can_decode", True):
        path = stem.with_suffix(".png")
        _say_if_replaced(path)
        image_tokenizer.decode(codes).save(path)
        return path
    path = stem.with_suffix(".codes.npy")
    _say_if_replaced(path)
    np.save(path, np.asarray(codes))
    log.warning("%s: the image tokenizer has no decoder; saved the image's codes", path)
    return path


def prompt_text(value, raw: str) -> str:
    """The prompt `prompt=RAW` gives: free text, so a value YAML reads as something else (a
    number, true/false, `Q: hi` as a mapping, `[a, b]` as a list) is the text as typed; null
    (or nothing) is no prompt; a quoted string is its content."""
    if value is None:
        return ""
    return value if isinstance(value, str) else raw


def _parse(argv: list[str]) -> GenerateConfig:
    """GenerateConfig from `key=value` arguments, `prompt=` taken as text (`prompt_text`)."""
    from omegaconf import OmegaConf

    prompts = [a.split("=", 1)[1] for a in argv if a.startswith("prompt=")]
    rest = [a for a in argv if not a.startswith("prompt=")]
    cfg = parse_args(GenerateConfig, rest, PROG)
    if not prompts:
        return cfg
    raw = prompts[-1]
    try:
        value = OmegaConf.from_dotlist([f"prompt={raw}"])
        value = OmegaConf.to_container(value, resolve=False)["prompt"]  # no ${...} lookups
    except Exception:  # not YAML (say, "[a,"), an interpolation that fails: text as typed
        value = raw
    return replace(cfg, prompt=prompt_text(value, raw))


def main(argv: list[str] | None = None) -> None:
    cfg = _parse(sys.argv[1:] if argv is None else argv)
    with exits_on_failure(PROG):
        results = run(cfg)
    for i, result in enumerate(results):
        line = f"[{i}] {cfg.prompt}" + (f" <image {cfg.image}>" if cfg.image else "")
        print(f"{line} -> {result['text']!r}" + "".join(f" [{p}]" for p in result["images"]))


if __name__ == "__main__":
    main()
