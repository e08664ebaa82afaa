"""Attention kernels for packed documents, measured in one run: forward+backward time and peak
memory of SDPA with a dense document mask, FlexAttention with a document BlockMask, and SDPA's
causal path (what one-document rows take; with several documents it is not the same function,
so it is the speed-of-light reference), at S = 2048 and 4096 with 1, 4 and 16 documents a row.

    .venv/bin/python scripts/bench_attention.py [--device cuda] [--json] [--iters 5] [--smoke]

`--smoke`: S = 128 with 4 documents, one iteration (a test runs it; the figures mean nothing).

FlexAttention has no backward on CPU (torch 2.13): there it is timed forward only, and so is
SDPA beside it (the `fwd_only` rows), so that the ratio compares like with like. Peak memory is
the extra memory one call holds at its peak beyond its inputs: the CUDA allocator's peak on a
GPU, the process's peak resident set on a CPU (Linux: /proc/self/clear_refs resets it).
Ratios are flex / sdpa_dense in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from mm_moe.model.attention import attend
from mm_moe.model.attention_mask import AttentionMask
from mm_moe.utils.cuda_check import cuda_missing

HEADS, KV_HEADS, HEAD_DIM = 16, 4, 64  # grouped-query, as the 1.4B presets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Extra bytes held at the peak of a call, beyond what was held before it."""

    def __init__(self, device: torch.device):
        self.device = device

    def _rss(self, field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
                self.before = self._rss("VmRSS:")
            except OSError:
                self.before = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.before
        else:
            peak = self._rss("VmHWM:")
            self.peak = None if self.before is None or peak is None else peak - self.before


def _inputs(B: int, S: int, docs: int, device, dtype, grad: bool):
    g = torch.Generator().manual_seed(S + docs)
    q = torch.randn(B, HEADS, S, HEAD_DIM, generator=g, dtype=dtype).to(device)
    k = torch.randn(B, KV_HEADS, S, HEAD_DIM, generator=g, dtype=dtype).to(device)
    v = torch.randn(B, KV_HEADS, S, HEAD_DIM, generator=g, dtype=dtype).to(device)
    for t in (q, k, v):
        t.requires_grad_(grad)
    # `docs` documents of random lengths per row
    cuts = torch.sort(torch.randperm(S - 1, generator=g)[: docs - 1] + 1).values
    doc = torch.zeros(S, dtype=torch.long)
    for c in cuts.tolist():
        doc[c:] += 1
    return q, k, v, doc.expand(B, S).contiguous().to(device)


def _case(backend: str, q, k, v, doc, backward: bool):
    def run():
        # the mask is built once per micro-batch in training: part of the cost
        mask = AttentionMask.build(None if backend == "sdpa_causal" else doc, backend[:4])
        out = attend(q, k, v, mask)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    return run


def _time(fn, device, iters: int) -> tuple[float, int | None]:
    fn()  # warm-up (FlexAttention compiles here)
    fn()
    with PeakMemory(device) as mem:
        fn()
        _sync(device)
    samples = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), mem.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--seq-lens", default="2048,4096")
    parser.add_argument("--docs", default="1,4,16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="S=128, 4 documents, 1 iteration")
    args = parser.parse_args()
    if args.device == "cuda" and (why := cuda_missing()):
        parser.error(f"--device cuda: {why}; use --device cpu")
    if args.smoke:
        args.seq_lens, args.docs, args.iters = "128", "4", 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backward = device.type == "cuda"  # CPU FlexAttention has no backward
    torch.manual_seed(0)
    rows = []
    for S in map(int, args.seq_lens.split(",")):
        for docs in map(int, args.docs.split(",")):
            q, k, v, doc = _inputs(args.batch, S, docs, device, dtype, backward)
            row = {"seq_len": S, "docs_per_row": docs, "fwd_only": not backward}
            for backend in ("sdpa_dense", "flex", "sdpa_causal"):
                name = "sdpa" if backend == "sdpa_dense" else backend
                ms, peak = _time(_case(name, q, k, v, doc, backward), device, args.iters)
                row[f"{backend}_ms"] = ms
                row[f"{backend}_peak_mib"] = None if peak is None else peak / 2**20
            row["flex_vs_dense_time"] = row["flex_ms"] / row["sdpa_dense_ms"]
            if row["flex_peak_mib"] and row["sdpa_dense_peak_mib"]:
                row["flex_vs_dense_memory"] = row["flex_peak_mib"] / row["sdpa_dense_peak_mib"]
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            del q, k, v
    if not args.json:
        for row in rows:
            print(
                "  ".join(
                    f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )


if __name__ == "__main__":
    main()
