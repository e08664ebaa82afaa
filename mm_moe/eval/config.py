"""Evaluation configuration (the `eval` config group).

    eval.interval=100                       # held-out loss every 100 steps (0: off)
    eval.sources=[{urls: data/demo/heldout, format: pairs}]

The zero-shot and text->image settings make both evaluations usable on a user's own labelled
shards: samples with an image member (png/jpg/webp) and a `cls` member holding the class index;
`labels[cls]` names the class inside the caption `templates`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mm_moe.data.config import SourceConfig
from mm_moe.errors import UserError

DIGITS = [str(d) for d in range(10)]


@dataclass
class ZeroShotConfig:
    # Labelled shards (image + `cls`); empty: the held-out images of eval.sources.
    urls: str | list[str] = ""
    # Class names, indexed by `cls`.
    labels: list[str] = field(default_factory=lambda: list(DIGITS))
    # Caption templates with a `{label}` field; a class scores the mean log-likelihood of its
    # captions over the templates.
    templates: list[str] = field(default_factory=lambda: ["a handwritten digit {label}"])
    # Held-out images scored (the first ones of the shards, in order).
    num_samples: int = 200
    # Images scored per forward pass (each with one row per class and template).
    batch_images: int = 8


@dataclass
class TextToImageConfig:
    # Images generated per class, from the caption made with templates[0].
    samples_per_label: int = 10
    temperature: float = 1.0
    top_k: int = 0
    # Classifier-free guidance scale (1: none): the caption's pull on each code is multiplied
    # by this against the same model with no caption (mm_moe/eval/text_to_image.py).
    guidance: float = 1.0
    # Best of this many images per caption: the one after which the model itself finds the
    # caption most likely (its image -> text direction reranks its text -> image samples;
    # the judge is not asked). 1: every image is a plain sample.
    rerank: int = 1
    # The judge: a small classifier trained on real labelled images (the zero-shot shards if
    # empty), seen through the image tokenizer (encoded and decoded, like generated images);
    # cached under cache_dir; empty: `eval_cache` beside the run's folder (runs/eval_cache for
    # runs/NAME), which the runs beside it share.
    classifier_urls: str | list[str] = ""
    classifier_steps: int = 300
    cache_dir: str = ""
    # Columns of the saved PNG grid per class (0: none).
    grid_samples: int = 3

    def judge_cache(self, run_dir: str | Path | None) -> Path:
        """Where the judge is cached for the run in `run_dir` (None: the working folder's
        runs/eval_cache)."""
        if self.cache_dir:
            return Path(self.cache_dir)
        if run_dir is None:
            return Path("runs") / "eval_cache"
        return Path(run_dir).resolve().parent / "eval_cache"


@dataclass
class EvalConfig:
    # Held-out loss every `interval` optimizer steps, and after the last; 0 turns it off.
    interval: int = 0
    # Held-out shards in the form of data.sources ({urls, format, weight}); empty with the
    # synthetic source: fresh synthetic rows from `seed`.
    sources: list[SourceConfig] = field(default_factory=list)
    # The held-out set: this many micro-batches as one process reads them (the same rows at
    # every evaluation and every world size, dealt row by row to the ranks).
    num_batches: int = 4
    # Rows per micro-batch; 0 takes the trainer's (at world size 1 for the set's size).
    micro_batch_size: int = 0
    # Data seed of the held-out rows (fixed: every evaluation scores the same rows).
    seed: int = 1234
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    text_to_image: TextToImageConfig = field(default_factory=TextToImageConfig)

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise UserError(f"eval.interval={self.interval} must be >= 0 (0 turns it off)")
        if self.num_batches < 1 or self.micro_batch_size < 0:
            raise UserError("eval.num_batches must be >= 1 and eval.micro_batch_size >= 0")
        if self.seed < 0:
            raise UserError(f"eval.seed={self.seed} must be >= 0")
        for i, src in enumerate(self.sources):
            if not src.urls:
                raise UserError(f"eval.sources[{i}].urls is empty")
            if not src.weight > 0:
                raise UserError(f"eval.sources[{i}].weight={src.weight} must be positive")
        zs, t2i = self.zero_shot, self.text_to_image
        if not zs.labels:
            raise UserError("eval.zero_shot.labels must name at least one class")
        bad = [t for t in zs.templates if "{label}" not in t]
        if not zs.templates or bad:
            raise UserError(
                f"eval.zero_shot.templates must be non-empty and each hold '{{label}}'; bad: {bad}"
            )
        if zs.num_samples < 1 or zs.batch_images < 1:
            raise UserError("eval.zero_shot.num_samples and batch_images must be >= 1")
        if min(t2i.samples_per_label, t2i.classifier_steps, t2i.rerank) < 1 or t2i.grid_samples < 0:
            raise UserError(
                "eval.text_to_image.samples_per_label, classifier_steps and rerank must be >= 1, "
                f"grid_samples >= 0 (got {t2i.samples_per_label}, {t2i.classifier_steps}, "
                f"{t2i.rerank}, {t2i.grid_samples})"
            )
        if t2i.temperature <= 0 or t2i.top_k < 0 or t2i.guidance < 1:
            raise UserError(
                "eval.text_to_image.temperature must be > 0, top_k >= 0 and guidance >= 1 "
                f"(got {t2i.temperature}, {t2i.top_k}, {t2i.guidance})"
            )

    def check_data(self, data_source: str) -> None:
        """Held-out rows need shards unless the training data is synthetic."""
        if self.interval and not self.sources and data_source != "synthetic_patterns":
            raise UserError(
                f"eval.interval={self.interval} needs eval.sources (held-out shards, e.g. "
                "[{urls: data/demo/heldout, format: pairs}]) with data.source="
                + data_source
                + "; eval.interval=0 turns evaluation off (an experiment overlay may set the "
                "interval after eval=none)"
            )

    def labelled_urls(self) -> str | list[str]:
        """Shards the zero-shot evaluation reads: eval.zero_shot.urls, else eval.sources."""
        if self.zero_shot.urls:
            return self.zero_shot.urls
        if self.sources:
            return [
                u for s in self.sources for u in ([s.urls] if isinstance(s.urls, str) else s.urls)
            ]
        raise UserError(
            "the zero-shot evaluation needs labelled shards: set eval.zero_shot.urls (or "
            "eval.sources) to shards whose samples hold an image and a `cls` member"
        )
