"""What the study trains: the models, the corpus, each run's overrides, and the digest that
names its run directory (a finished run with the same digest is reused).

The composing function comes from the entry point (mm_moe.cli.compose): a library module
imports no entry point.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mm_moe.errors import UserError

MODALITIES = ("text", "image")

# name -> (label, Hydra overrides); CPU shapes are tiny_dense's (d=128, 4 layers).
CPU_MODELS = {
    "dense": ("dense", ["model=tiny_dense", "moe=none"]),
    "mixed8": ("mixed EC-8", ["model=tiny_dense", "moe=mixed8_ec"]),
    "moma": ("MoMa 4t4i", ["model=tiny_dense", "moe=moma_4t4i_ec"]),
    "moma_mod": (
        "MoMa 4t4i + MoD",
        [
            "model=tiny_dense",
            "moe=moma_4t4i_ec",
            "model.mod.layers=[1,3]",
            "model.mod.capacity=0.25",
        ],
    ),
    "mot": ("MoT", ["model=tiny_dense", "moe=none", "model.untie=[ffn,attention,norms]"]),
    # Token choice (dropless, top-1, renormalized): every token gets an FFN, causal.
    "moma_tc": ("MoMa 4t4i TC", ["model=tiny_dense", "moe=moma_4t4i_tc"]),
}
# MoMa expert choice with each routing remedy (docs/model.md#routing-health): `--models routing`
# runs them with dense, MoMa (EC) and MoMa TC.
_EC = ["model=tiny_dense", "moe=moma_4t4i_ec"]
ROUTING_MODELS = {
    "moma_normalized": ("MoMa EC, normalized gates", [*_EC, "moe.expert_choice_gate=normalized"]),
    "moma_orthogonal": ("MoMa EC, orthogonal router init", [*_EC, "moe.router_init=orthogonal"]),
    "moma_router_lr": ("MoMa EC, router lr x0.1", [*_EC, "moe.router_lr_scale=0.1"]),
    # Annealed over the first half of the routing study's 600 steps.
    "moma_noise": (
        "MoMa EC, Gumbel noise 1 annealed",
        [*_EC, "moe.router_noise=1.0", "moe.router_noise_anneal_steps=300"],
    ),
    "moma_cosine": ("MoMa EC, cosine router", [*_EC, "moe.router_logits=cosine"]),
}
CPU_MODELS.update(ROUTING_MODELS)
DEFAULT_MODELS = "dense,mixed8,moma,moma_tc,mot"
# The models without experts: --moe-override leaves them alone (their runs stay the same run).
NO_EXPERTS = ("dense", "mot")


def label(args, name: str) -> str:
    """A model's name in the tables and plots: its preset's, with the --moe-override values
    its runs took (a 3t5i run is not labelled "MoMa 4t4i" alone)."""
    mine = [] if name in NO_EXPERTS else list(getattr(args, "moe_override", []))
    text = args.table[name][0]
    return f"{text} ({', '.join(mine)})" if mine else text


ROUTING = "dense,moma,moma_tc," + ",".join(ROUTING_MODELS)
# The 1.4B presets (configs/model/*_1.4b.yaml) and their dense equivalent.
GPU_MODELS = {
    "dense": ("dense 280M", ["model=dense_280m"]),
    "mixed8": ("mixed EC-8 1.4B", ["model=moe_mixed8_1.4b"]),
    "moma": ("MoMa 4t4i 1.4B", ["model=moma_4t4i_1.4b"]),
    "moma_mod": ("MoMa 4t4i + MoD 1.4B", ["model=moma_4t4i_mod_1.4b"]),
    "mot": ("MoT (dense 720M shapes)", ["model=mot_1.4b"]),
    "moma_tc": ("MoMa 4t4i TC 1.4B", ["model=moma_4t4i_1.4b", "moe=moma_4t4i_tc"]),
}
# The demo experiment and its held-out digits; a small batch that 2 CPU cores run quickly.
CPU_BASE = [
    "experiment=demo",
    "eval=demo",
    "moe.gemm=loop",
    "trainer.global_batch_size=16",
    "trainer.micro_batch_size=16",
    "optim.lr=3e-3",
    "optim.warmup_steps=30",
]
# Tiny shapes for tests and smoke runs (--tiny).
TINY = [
    "data.seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=8",
    "optim.warmup_steps=2",
    "eval.num_batches=1",
    "eval.micro_batch_size=4",
    "trainer.cpu_threads=1",
]


def check_args(args) -> str | None:
    """Resolves args.model_list, args.table and args.dense_steps; the error message for
    settings that cannot make a study, or None."""
    table = CPU_MODELS if args.scale == "cpu" else GPU_MODELS
    models = ROUTING if args.models == "routing" else args.models
    args.model_list = [m.strip() for m in models.split(",") if m.strip()]
    args.table = table
    bad = [m for m in args.model_list if m not in table]
    if bad or not args.model_list:
        return f"--models: unknown {bad}; choose from {', '.join(table)}"
    if "dense" not in args.model_list:
        return "--models must include dense (the savings factor is measured against it)"
    if args.seeds < 1 or args.steps < 1 or args.eval_interval < 1:
        return "--seeds, --steps and --eval-interval must be >= 1"
    if getattr(args, "jobs", 1) < 1 or getattr(args, "nproc", 1) < 1:
        return "--jobs and --nproc must be >= 1"
    if getattr(args, "heldout_batches", 0) < 0:
        return "--heldout-batches must be >= 0"
    args.dense_steps = args.dense_steps or 2 * args.steps
    if args.dense_steps < args.steps:
        return "--dense-steps must be >= --steps"
    return None


@dataclass
class Corpus:
    """The data every run of the study reads: overrides placed after the base settings (the
    model presets and --override still win), the files whose content names the data in the
    run digests, and the command that builds it where it is missing."""

    name: str
    overrides: list[str] = field(default_factory=list)
    built: list[Path] = field(default_factory=list)
    build_cmd: list[str] | None = None
    ready: Path | None = None  # exists once the corpus is built
    # What a built corpus's record (`ready`) must say: another value is another corpus.
    expected: dict = field(default_factory=dict)
    # The held-out sets scored whole after training, by name: folders of `pairs` shards.
    heldout: dict[str, Path] = field(default_factory=dict)


def tokenizer_dir(args, repo: Path) -> Path:
    """The tokenizers every run reads: the last `--override tokenizer.path=`, else the
    demo's (experiment=demo's tokenizer group); the study corpus is pretokenized with them."""
    paths = [o.split("=", 1)[1] for o in args.override if o.startswith("tokenizer.path=")]
    return Path(paths[-1]) if paths else repo / "tokenizers" / "demo"


def _overridden_heldout(args) -> Path | None:
    """The held-out shards of the last `--override eval.sources=[{urls: X, ...}]` (one
    source): the set the runs evaluate on is the one scored whole after training."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [o for o in args.override if o.startswith("eval.sources=")]
    if not given:
        return None
    sources = OverridesParser.create().parse_override(given[-1]).value()
    if len(sources) == 1 and isinstance(sources[0].get("urls"), str):
        return Path(sources[0]["urls"])
    return None


def check_heldout(corpus: Corpus) -> None:
    """Every held-out set there before any run trains (they are scored after all of them)."""
    from mm_moe.data.shards import expand_urls

    for name, folder in corpus.heldout.items():
        expand_urls(str(folder), f"the study's held-out set {name!r} ({corpus.name} corpus)")


def corpus_for(args, repo: Path, python: str) -> Corpus:
    """`demo`: experiment=demo's own data (data/demo), as the study always read it, so its
    run digests are those of earlier studies. `study`: the corpus of
    data_pipelines/build_study_corpus.py in --corpus-dir, where no training image repeats:
    pretokenized pairs (or the pairs, without tokenizers), held out on DIR/heldout."""
    tokenizers = tokenizer_dir(args, repo)
    tokenizer_metrics = tokenizers / "metrics.json"
    if args.corpus == "demo":
        demo = repo / "data" / "demo"
        built = [demo / "corpus.json", tokenizer_metrics]
        heldout = _overridden_heldout(args) or demo / "heldout"
        return Corpus("demo", [], built, heldout={"heldout": heldout})
    root = Path(args.corpus_dir)
    cmd = [python, str(repo / "data_pipelines" / "build_study_corpus.py"), f"output={root}"]
    cmd += [f"pairs={args.corpus_pairs}", f"seed={args.corpus_seed}", f"tokenizers={tokenizers}"]
    tokens = root / "pairs_tokens"
    pretokenized = tokens.is_dir() and any(tokens.glob("*.tar"))  # written with tokenizers
    train = f"{{urls:{tokens},format:tokens,weight:1}}" if pretokenized else None
    train = train or f"{{urls:{root / 'pairs'},format:pairs,weight:1}}"
    overrides = [
        f"data.sources=[{train}]",
        f"eval.sources=[{{urls:{root / 'heldout'},format:pairs,weight:1}}]",
    ]
    manifest = root / "manifest.json"
    expected = {"pairs": args.corpus_pairs, "seed": args.corpus_seed}
    heldout = {name: root / name for name in ("heldout", "heldout_deformed")}
    built = [manifest, tokenizer_metrics]
    return Corpus("study", overrides, built, cmd, manifest, expected, heldout)


def overrides(args, name: str, seed: int, steps: int, run_dir: Path) -> list[str]:
    """The Hydra overrides of one run (`args.corpus_overrides`: the corpus's)."""
    base = CPU_BASE if args.scale == "cpu" else ["eval=demo"]
    warmup = 2 if args.tiny else 30
    return [
        *base,
        *getattr(args, "corpus_overrides", []),
        *(TINY if args.tiny else []),
        *args.table[name][1],
        f"trainer.max_steps={steps}",
        f"trainer.seed={seed}",
        f"trainer.log_interval={args.eval_interval}",
        f"eval.interval={args.eval_interval}",
        f"optim.decay_steps={max(1, args.dense_steps - warmup)}",
        # A run cut short (a killed session) continues from its last checkpoint on rerun.
        f"checkpoint.interval={min(steps, 250)}",
        "checkpoint.keep_last=1",
        "checkpoint.resume=auto",
        "checkpoint.overwrite=true",
        "logging.wandb.mode=disabled",
        "logging.progress=lines",
        f"trainer.run_dir={run_dir}",
        *args.override,
        *(getattr(args, "moe_override", []) if name not in NO_EXPERTS else []),
    ]


def config_digest(cfg: dict, built: list[str]) -> str:
    """8 hex digits of what a run trains: its composed config (a plain dict; `cfg` is
    changed) without what does not change the trained model, and the built data and
    tokenizer descriptions it reads (`built`: their files' text)."""
    cfg["trainer"].pop("run_dir", None)
    # What the evaluations after training read, not what trains: a change re-evaluates the
    # finished runs (run.train_and_eval) instead of training them again.
    cfg["eval"].pop("zero_shot")
    cfg["eval"].pop("text_to_image")
    cfg.pop("checkpoint")  # where and how often it saves: not what it trains (exact resume)
    # How fast it trains, not what: the image cache is exact, and the fused AdamW differs
    # from the per-tensor loop only in rounding (runs from before these keys still count).
    cfg["data"].pop("image_cache_size", None)
    cfg["optim"].pop("fused", None)
    _as_first_digested(cfg)
    text = [json.dumps(cfg, sort_keys=True, default=str), *built]
    return hashlib.sha1("\n".join(text).encode()).hexdigest()[:8]


# Keys added after the study's first runs, at values that train what those runs trained: left
# out of the digest, so that finished runs keep their names (another value is another run).
ADDED_AT_NO_EFFECT = {
    ("trainer", "activation_checkpointing"): "none",  # recomputes; the same numbers
    ("trainer", "grad_accum_dtype"): "auto",  # the behaviour before the key
    ("trainer", "profile"): "",  # a trace file only
    ("tokenizer", "allow_changed"): False,  # a check, not the data
    ("parallel", "overlap_comm"): None,  # how ZeRO reduces, not what: the default before
    ("parallel", "reduce_bucket_size"): 500_000_000,  # DeepSpeed's default, as before the key
}


def _as_first_digested(cfg: dict) -> None:
    """The config in the keys the study's first runs were digested with."""
    for (section, key), value in ADDED_AT_NO_EFFECT.items():
        if cfg.get(section, {}).get(key, value) == value:
            cfg.get(section, {}).pop(key, None)
    # moe.top1_straight_through: the first runs' renormalized top-1 gates had no gradient
    # (false). Where the key changes nothing (not token choice top-1 renormalized) or is
    # false, they are the same run; true there trains another run.
    moe = cfg.get("moe", {})
    top1_renormalized = (
        moe.get("experts_per_modality")
        and moe.get("router") == "token_choice"
        and moe.get("renormalize")
        and moe.get("top_k", 1) * moe.get("granularity", 1) == 1
    )
    if not (top1_renormalized and moe.get("top1_straight_through")):
        moe.pop("top1_straight_through", None)
    trainer = cfg.get("trainer", {})
    if "peak_tflops" in trainer:  # trainer.peak_flops (FLOP/s) before: MFU only
        trainer["peak_flops"] = float(trainer.pop("peak_tflops")) * 1e12


class Planner:
    """Each run's overrides, digest, run directory and evaluation settings, composed once per
    distinct config (in the main thread: Hydra is one per process)."""

    def __init__(self, args, compose: Callable, corpus: Corpus):
        self.args, self.compose, self.corpus = args, compose, corpus
        args.corpus_overrides = corpus.overrides
        self._composed: dict[tuple, tuple[str, tuple, bool]] = {}

    def overrides(self, name: str, seed: int, steps: int, run_dir: Path) -> list[str]:
        return overrides(self.args, name, seed, steps, run_dir)

    def _compose(self, name: str, seed: int, steps: int) -> tuple[str, tuple, bool]:
        found = self.overrides(name, seed, steps, Path())
        key = tuple(o for o in found if "run_dir=" not in o)
        if key not in self._composed:
            try:
                composed = self.compose(list(key))
            except UserError as exc:  # a config error of one arm: name it, in one line
                given = " (--moe-override applies to every model with experts)"
                given = given if getattr(self.args, "moe_override", None) else ""
                raise UserError(f"model {name}{given}: {exc}") from None
            built = [p.read_text() for p in self.corpus.built if p.is_file()]
            settings = (composed.eval.zero_shot, composed.eval.text_to_image)
            fixed = composed.optim.decay_steps > 0  # the schedule does not follow max_steps
            self._composed[key] = (config_digest(asdict(composed), built), settings, fixed)
        return self._composed[key]

    def run_dir(self, name: str, seed: int, steps: int) -> Path:
        """Runs are named by what they train: a finished run stands for any later request
        with the same composed config (the dense seed-0 run is the long dense run when
        --dense-steps == --steps, and studies share their common runs), and a changed preset,
        experiment or data is a new run."""
        digest = self._compose(name, seed, steps)[0]
        return Path(self.args.out) / "runs" / f"{name}_s{seed}_{steps}_{digest}"

    def prefix_runs(self, name: str, seed: int, steps: int) -> list[tuple[int, Path]]:
        """(steps, run directory) of the shorter runs of this model and seed in OUT/runs that
        train what this run trains up to their length, longest first: their composed configs
        differ from this run's only in trainer.max_steps (every run shares the long dense
        run's schedule, set by optim.decay_steps), so this run is one of them continued."""
        if not self._compose(name, seed, steps)[2]:
            return []
        stem = f"{name}_s{seed}_"
        found = set()
        for path in (Path(self.args.out) / "runs").glob(f"{stem}*"):
            parts = path.name[len(stem) :].split("_")
            if len(parts) == 2 and parts[0].isdigit() and 0 < int(parts[0]) < steps:
                found.add(int(parts[0]))
        out = []
        for shorter in sorted(found, reverse=True):
            run_dir = self.run_dir(name, seed, shorter)
            if run_dir.is_dir() and self._compose(name, seed, shorter)[2]:
                out.append((shorter, run_dir))
        return out

    def multimodal_settings(self, name: str, seed: int, steps: int) -> dict:
        """The zero-shot and text->image settings of this run's composed config, with the
        study's sample counts (plain JSON: evals.json records what its figures were measured
        with)."""
        from dataclasses import replace

        zero_shot, t2i = self._compose(name, seed, steps)[1]
        settings = {
            "zero_shot": asdict(replace(zero_shot, num_samples=self.args.zero_shot)),
            "text_to_image": asdict(replace(t2i, samples_per_label=self.args.t2i_per_label)),
        }
        return json.loads(json.dumps(settings))

    def heldout_settings(self) -> dict:
        """The whole held-out sets scored after training and how many micro-batches of each
        (plain JSON, as evals.json records it); {} with --heldout-batches 0 or none."""
        if not getattr(self.args, "heldout_batches", 0) or not self.corpus.heldout:
            return {}
        sets = {name: str(folder) for name, folder in self.corpus.heldout.items()}
        return {"sets": sets, "num_batches": self.args.heldout_batches}

    def tasks(self) -> list[tuple[str, int, int]]:
        """(name, seed, steps) of every run: the long dense run first, then each seed's."""
        args = self.args
        tasks = [("dense", 0, args.dense_steps)]
        tasks += [(n, s, args.steps) for s in range(args.seeds) for n in args.model_list]
        return list(dict.fromkeys(tasks))

    def source_sizes(self) -> list[tuple[str, float, int]]:
        """(folder, weight, documents) of each training source of the dense runs: sizes from
        the corpus's record (the study corpus's manifest.json, the demo's corpus.json) for
        sources inside the corpus's folder; 0 for others (a source of --override's)."""
        cfg = self.compose(self.overrides("dense", 0, self.args.steps, Path("runs/unused")))
        records = {
            path.parent.resolve(): json.loads(path.read_text())
            for path in self.corpus.built
            if path.is_file() and path.name in ("manifest.json", "corpus.json")
        }
        out = []
        for src in cfg.data.sources:
            first = src.urls if isinstance(src.urls, str) else src.urls[0]
            folder = Path(first.split("{")[0])
            folder = folder.parent if "{" in first or first.endswith(".tar") else folder
            record = records.get(folder.resolve().parent, {})
            size = record.get("pairs" if src.format == "tokens" else src.format, 0)
            out.append((folder.name, src.weight, size if isinstance(size, int) else 0))
        return out

    def flops_per_token(self, name: str) -> dict:
        cfg = self.compose(self.overrides(name, 0, self.args.steps, Path("runs/unused")))
        model = cfg.model.with_vocab(cfg.tokenizer.build().vocab.size)
        return model.flops_per_token(cfg.data.seq_len, cfg.moe)
