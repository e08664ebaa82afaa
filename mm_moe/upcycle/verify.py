"""`verify=true`: the source's and the upcycled model's logits on the same input (text, and
images where the source knows image tokens).

The reference is the source itself: transformers' model for a Hugging Face folder (this
project's dense import when transformers is not installed), `load_pretrained` for a native
checkpoint. The result is loaded back from the written checkpoint, so the check covers the file
format too. Logits are compared over the source's vocabulary (new rows have no counterpart).

The logits cannot see where image codes live (every expert starts as a copy of the same FFN,
so an image token taken for text computes the same): for a Hugging Face folder that records
mm_moe's vocabulary (an mm_moe export, recorded_vocab.py) the written layout and the rows of its
image codes and specials are compared with the source's too; for one that does not, the output
says that the image vocabulary was not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mm_moe.config.schema import TrainConfig
from mm_moe.model.config import ModelConfig
from mm_moe.upcycle.config import UpcycleConfig

# fp32, relative to the largest reference logit when that exceeds 1.
TOLERANCE = 1e-5


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_abs_logit: float
    reference: str
    tokens: tuple[int, int]
    # Why the function is not expected to be preserved (empty: it is).
    reasons: list[str] = field(default_factory=list)
    images: bool = False  # the input held image tokens too
    # What was found of the vocabulary layout (one line; empty: nothing to say), and how the
    # written layout differs from the source's recorded one (non-empty: FAILED).
    vocabulary: str = ""
    layout_problems: list[str] = field(default_factory=list)
    # What the comparison of eval-mode logits over the source's ids does not cover.
    caveats: list[str] = field(default_factory=list)

    @property
    def within_tolerance(self) -> bool:
        return self.max_abs_diff <= TOLERANCE * max(1.0, self.max_abs_logit)

    @property
    def status(self) -> str:
        """passed | FAILED | not checked (the function is not preserved by construction, so
        a logit difference proves nothing either way)."""
        if self.layout_problems:
            return "FAILED"
        if self.reasons:
            return "not checked"
        return "passed" if self.within_tolerance else "FAILED"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def lines(self) -> list[str]:
        B, S = self.tokens
        out = [
            f"verify: reference {self.reference}, {B}x{S} "
            f"{'text and image' if self.images else 'text-only'} tokens, fp32",
            f"verify: max |logit difference| = {self.max_abs_diff:.3g} "
            f"(largest |logit| {self.max_abs_logit:.3g}, tolerance {TOLERANCE:g})",
        ]
        if self.vocabulary:
            out.append(f"verify: {self.vocabulary}")
        if self.layout_problems:
            out.append("verify: FAILED: the vocabulary layout is not the source's:")
            out += [f"  - {p}" for p in self.layout_problems]
        if self.reasons:
            out.append(
                "verify: not checked: not function-preserving by construction, so the logits "
                "may differ:"
            )
            out += [f"  - {r}" for r in self.reasons]
        elif not self.within_tolerance:
            out.append("verify: FAILED: expected exact")
        elif not self.layout_problems and self.caveats:
            out.append(
                "verify: function preserved (eval-mode logits over the source's ids); what "
                "that does not cover:"
            )
            out += [f"  - {r}" for r in self.caveats]
        elif not self.layout_problems:
            out.append("verify: function preserved")
        return out


def _reference(source: str, source_format: str, ids_BS: torch.Tensor):
    """(logits, what computed them, the source's input embedding [V, D])."""
    if source_format == "native":
        from mm_moe.eval.pretrained import load_pretrained

        model = load_pretrained(source)
        return model(ids_BS).logits, "the native dense source", model.embed.weight
    try:
        import transformers
    except ImportError:
        from mm_moe.upcycle.hf_import import import_dense

        _, model = import_dense(source)
        name = "the dense import (transformers is not installed)"
        return model(ids_BS).logits, name, model.embed.weight
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from mm_moe.upcycle.hf_import import read_config

    if read_config(source).get("model_type") == "chameleon":
        cls = transformers.ChameleonForConditionalGeneration
    else:
        cls = transformers.AutoModelForCausalLM
    model = cls.from_pretrained(source).float().eval()
    embed_VD = model.get_input_embeddings().weight
    return model(input_ids=ids_BS).logits, f"transformers {type(model).__name__}", embed_VD


def verify_ids(vocab, num_source_ids: int, shape: tuple[int, int], gen, images: bool):
    """[B, S] input: random text ids the source knows (no image codes, no specials), and with
    `images` each row's middle third an image (boi, codes, eoi)."""
    B, S = shape
    candidates = np.arange(num_source_ids)
    specials = (vocab.bos, vocab.eos, vocab.pad, vocab.boi, vocab.eoi)
    text = candidates[~vocab.is_image(candidates) & ~np.isin(candidates, specials)]
    pick = torch.randint(0, len(text), (B, S), generator=gen)
    ids_BS = torch.from_numpy(text)[pick]
    if images and vocab.image_size and S >= 6:
        lo, hi = S // 3, 2 * S // 3
        codes = torch.randint(0, vocab.image_size, (B, hi - lo - 2), generator=gen)
        ids_BS[:, lo] = vocab.boi
        ids_BS[:, lo + 1 : hi - 1] = torch.from_numpy(vocab.image_token_ids(codes.numpy()))
        ids_BS[:, hi - 1] = vocab.eoi
    return ids_BS


def expected_differences(
    target: TrainConfig, ucfg: UpcycleConfig, source_cfg: ModelConfig
) -> list[str]:
    """Why this upcycling is not function-preserving (static reasons; empty: it should be)."""
    moe, reasons = target.moe, []
    if moe.enabled and moe.router == "expert_choice":
        reasons.append(
            "moe.router=expert_choice: each expert picks its own tokens (top-C in training; in "
            "eval mode the auxiliary routers, untrained after upcycling, decide), so a token "
            "is processed by no expert or by several, and expert outputs are weighted by raw "
            f"{moe.score} scores that need not sum to 1"
        )
    elif moe.enabled and not moe.renormalize:
        reasons.append(
            "moe.renormalize=false: a token's expert outputs are weighted by its top-k scores, "
            "which sum to less than 1"
        )
    if moe.enabled and moe.granularity > 1 and ucfg.router_init_std == 0:
        reasons.append(
            "router_init_std=0 with moe.granularity>1: every score ties, so top-k need not "
            "select whole copies of the FFN"
        )
    if moe.enabled and ucfg.drop_ratio > 0:
        reasons.append(
            f"drop_ratio={ucfg.drop_ratio}: Drop-Upcycling re-initialized that fraction of "
            "each expert's hidden units"
        )
    if moe.enabled and ucfg.expert_noise > 0:
        reasons.append(f"expert_noise={ucfg.expert_noise}: noise was added to the expert copies")
    if target.model.mod.layers:
        reasons.append(
            f"model.mod.layers={target.model.mod.layers}: mixture-of-depths lets tokens skip "
            "those blocks (in eval mode the untrained auxiliary routers choose)"
        )
    for name in ("rope_theta", "norm_eps"):
        if getattr(source_cfg, name) != getattr(target.model, name):
            reasons.append(f"model.{name} differs from the source's")
    return reasons


def caveats(target: TrainConfig, source_cfg: ModelConfig) -> list[str]:
    """What makes training start from another function than the verified one: eval-mode
    logits over the source's ids."""
    moe, out = target.moe, []
    grown = target.model.vocab_size - source_cfg.vocab_size
    if grown > 0:
        out.append(
            f"the vocabulary grows by {grown} ids ({source_cfg.vocab_size} -> "
            f"{target.model.vocab_size}): their output rows share the softmax, so the "
            "probabilities over the source's ids move a little (their mean-of-rows init keeps "
            "the share small, Hewitt 2021) until they learn their own logits"
        )
    if moe.enabled and moe.router == "token_choice" and (moe.capacity_factor or 0) > 0:
        out.append(
            f"moe.capacity_factor={moe.capacity_factor}: in training an expert takes at most "
            "that many tokens and the rest get no FFN output (evaluation is dropless); "
            "moe.capacity_factor=0 starts training from the dense model's function"
        )
    if moe.enabled and moe.router_noise > 0:
        out.append(f"moe.router_noise={moe.router_noise}: noise on the training-time selection")
    return out


def _unprocessed(stats: dict[str, torch.Tensor], images: bool) -> str:
    """Each group's share of its tokens that no expert took, per layer (image groups only
    where the input held images)."""
    parts = [
        f"{k.removeprefix('moe/').removesuffix('/dropped')} {float(v):.2f}"
        for k, v in stats.items()
        if k.startswith("moe/") and k.endswith("/dropped") and (images or "/image/" not in k)
    ]
    return ", ".join(parts)


@torch.no_grad()
def verify(
    ucfg: UpcycleConfig, target: TrainConfig, source_cfg: ModelConfig, vocab
) -> VerifyResult:
    """Logits of the source and of the checkpoint written to `ucfg.out` on the same input:
    text the source knows, and images where the source knows them (a native source, or
    Chameleon); compared over the source's vocabulary (transformers' Chameleon gives image-token
    logits no value: those columns are left out)."""
    from mm_moe.eval.pretrained import load_pretrained

    seq_len = min(ucfg.verify_seq_len, source_cfg.max_seq_len, target.model.max_seq_len)
    gen = torch.Generator().manual_seed(ucfg.seed)
    V = source_cfg.vocab_size
    recorded = _recorded_vocab(ucfg)  # the input in the source's ids, wherever they went
    images = ucfg.source_format == "native" or bool(vocab.image_ids) or recorded is not None
    layout = vocab if recorded is None else recorded
    ids_BS = verify_ids(layout, V, (ucfg.verify_batch_size, seq_len), gen, images)
    ref_BSV, reference, source_VD = _reference(ucfg.source, ucfg.source_format, ids_BS)
    model = load_pretrained(ucfg.out)
    model.collect_stats = True  # eval forwards skip routing statistics unless asked
    result = model(ids_BS)  # modality ids from the vocabulary
    vocabulary, problems = _vocabulary_check(ucfg, recorded, model, source_VD)
    columns = ~vocab.image_id_mask()[:V] if vocab.image_ids else torch.ones(V, dtype=torch.bool)
    ours, ref = result.logits[..., :V][..., columns].float(), ref_BSV[..., :V][..., columns].float()
    reasons = expected_differences(target, ucfg, source_cfg)
    if target.moe.enabled and target.moe.router == "expert_choice":
        unprocessed = _unprocessed(result.stats, images)
        reasons.append(f"tokens processed by no expert, per layer: {unprocessed}")
    return VerifyResult(
        max_abs_diff=(ours - ref).abs().max().item(),
        max_abs_logit=ref.abs().max().item(),
        reference=reference,
        tokens=tuple(ids_BS.shape),
        reasons=reasons,
        images=images,
        vocabulary=vocabulary,
        layout_problems=problems,
        caveats=caveats(target, source_cfg),
    )


def _recorded_vocab(ucfg: UpcycleConfig):
    """The layout a Hugging Face source records (an mm_moe export), else None."""
    if ucfg.source_format != "hf":
        return None
    from mm_moe.upcycle.hf_import import read_config
    from mm_moe.upcycle.recorded_vocab import read_vocab

    return read_vocab(ucfg.source, read_config(ucfg.source))


def _vocabulary_check(ucfg: UpcycleConfig, recorded, model, source_VD) -> tuple[str, list[str]]:
    """(what was found of the vocabulary, how the written layout differs from the recorded
    one): a native source keeps its own vocabulary (nothing to say), Chameleon's comes from its
    vocabulary_map, a Llama from elsewhere has no image vocabulary to compare with."""
    from mm_moe.upcycle.recorded_vocab import VOCAB_FILE, layout_problems

    if ucfg.source_format != "hf":
        return "", []
    written = model.vocab  # the import always writes <out>/vocab.yaml
    if recorded is not None:
        problems = layout_problems(recorded, written, model.embed.weight, source_VD)
        found = (
            f"vocabulary: the source's {VOCAB_FILE} (its image codes and specials at their ids, "
            "their embedding rows copied)"
        )
        return ("" if problems else found), problems
    if written.image_ids:
        return "vocabulary: Chameleon's vocabulary_map (image codes inside its vocabulary)", []
    codes = written.image_token_ids(range(written.image_size))
    where = f" (ids {codes.min()}..{codes.max()})" if len(codes) else ""
    return (
        f"vocabulary not checked: the source records no image vocabulary (no {VOCAB_FILE}), "
        f"so all its ids are text; the {written.image_size} image codes{where}, boi and eoi "
        "are new rows, untested (the input was text-only)",
        [],
    )
