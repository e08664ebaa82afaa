"""Both multimodal evaluations of a trained model, from its config's `eval` group."""

from __future__ import annotations

from pathlib import Path

from mm_moe.eval.config import EvalConfig
from mm_moe.eval.judge import load_or_train_judge
from mm_moe.eval.labelled import labelled_images
from mm_moe.eval.text_to_image import text_to_image_eval
from mm_moe.eval.zero_shot import zero_shot_classify


def multimodal_evals(
    model, tok, tokenizer_cfg, cfg: EvalConfig, out_dir: Path | None = None, seed: int = 0
) -> dict:
    """{"zero_shot": ..., "text_to_image": ..., "judge_accuracy": ...}; the PNG grid of
    generated images goes to out_dir/text_to_image.png (out_dir: the run's folder, beside
    which the judge is cached unless eval.text_to_image.cache_dir says where)."""
    zs, t2i = cfg.zero_shot, cfg.text_to_image
    urls = cfg.labelled_urls()
    images = labelled_images(urls, zs.num_samples, "eval.zero_shot.urls", len(zs.labels))
    zero_shot = zero_shot_classify(model, tok, images, zs.labels, zs.templates, zs.batch_images)
    judge, judge_acc = load_or_train_judge(
        tok,
        tokenizer_cfg,
        t2i.classifier_urls or urls,
        len(zs.labels),
        t2i.classifier_steps,
        t2i.judge_cache(out_dir),
    )
    grid = Path(out_dir) / "text_to_image.png" if out_dir is not None else None
    generated = text_to_image_eval(
        model,
        tok,
        judge,
        zs.labels,
        zs.templates[0],
        t2i.samples_per_label,
        t2i.temperature,
        t2i.top_k,
        seed,
        grid,
        t2i.grid_samples,
        t2i.guidance,
        t2i.rerank,
    )
    return {"zero_shot": zero_shot, "text_to_image": generated, "judge_accuracy": judge_acc}
