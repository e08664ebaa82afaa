"""SwiGLU experts stored as stacked weights and run as one grouped GEMM.

Shape legend: E experts, d width, h expert hidden, N rows sorted by expert.
"""

from __future__ import annotations

import itertools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from mm_moe.errors import UserError
from mm_moe.utils.host_to_device import host_to_device

log = logging.getLogger("mm_moe")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: torch._grouped_mm's
    backward rejects expanded (zero-stride) gradients such as those of `y.sum()`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # An empty tensor counts as contiguous whatever its strides, and the kernel still
        # rejects zero strides: a fresh one for no rows.
        return (
            grad.contiguous()
            if grad.numel()
            else torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        )


def grouped_mm_problem(
    device: torch.device, dtype: torch.dtype, d_model: int, hidden: int
) -> str | None:
    """Why `torch._grouped_mm` cannot run the experts here; None when it can."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm (torch >= 2.8 has it)"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (9, 0):
            return f"it needs a Hopper GPU (compute capability >= 9.0), this one has {capability}"
        if dtype != torch.bfloat16:
            return f"on CUDA it takes bf16 inputs, these are {dtype} (trainer.precision=bf16)"
    elif device.type != "cpu":
        return f"torch has no grouped GEMM kernel for {device.type}"
    # Every row of the inputs, weights and outputs must start on a 16-byte boundary.
    per_row = 16 // torch.empty((), dtype=dtype).element_size()
    if d_model % per_row or hidden % per_row:
        return (
            f"rows must be multiples of 16 bytes: d_model={d_model} and the expert hidden "
            f"size {hidden} must be multiples of {per_row} in {dtype}"
        )
    return None


def choose_gemm(gemm: str, device: torch.device, dtype: torch.dtype, d_model: int, hidden: int):
    """(path, why) for `moe.gemm` on this device and dtype: grouped_mm | padded | loop."""
    problem = grouped_mm_problem(device, dtype, d_model, hidden)
    if gemm == "grouped_mm":
        if problem is not None:
            raise UserError(
                f"moe.gemm=grouped_mm cannot run on {device.type} in {dtype}: {problem}. "
                "Use moe.gemm=auto (it falls back to padded or loop GEMMs)"
            )
        return "grouped_mm", "moe.gemm=grouped_mm"
    if gemm != "auto":
        return gemm, f"moe.gemm={gemm}"
    if (
        device.type == "cuda"
        and problem is None
        and torch.cuda.get_device_capability(device)[0] > 9
    ):
        # pytorch/pytorch#172439: on Blackwell (B200) the grouped kernel's backward gives
        # experts that received no token non-zero weight gradients. Chosen by hand only.
        problem = (
            "newer than Hopper: its grouped GEMM backward gives empty experts non-zero "
            "gradients (pytorch/pytorch#172439); moe.gemm=grouped_mm forces it"
        )
    if device.type == "cuda" and problem is None:
        return "grouped_mm", "moe.gemm=auto: torch._grouped_mm on a Hopper GPU in bf16"
    if device.type == "cuda":
        return "padded", (
            f"moe.gemm=auto: no torch._grouped_mm ({problem}); batched GEMMs over rows "
            "padded to the busiest expert, a loop of GEMMs when that would more than double "
            "the work"
        )
    if problem is None and dtype == torch.float32:
        # scripts/bench_step.py, MoMa token choice: 1.52x dense against the loop's 1.95x at
        # the tiny shapes, 1.53x against 1.61x at d=512. Expert choice's equal counts still
        # run as batched GEMMs (forward_runs): faster than the grouped kernel on CPU.
        return "grouped_mm", (
            "moe.gemm=auto on CPU in fp32: torch._grouped_mm for uneven counts (one call, "
            "not a loop over experts), batched GEMMs for expert choice's equal counts"
        )
    why = problem or "bf16 on CPU"
    return "loop", f"moe.gemm=auto on CPU: a loop of GEMMs over experts ({why})"


def _grouped_mm(x_Nd: torch.Tensor, w_Edh: torch.Tensor, offs_E: torch.Tensor):
    return _ContiguousGrad.apply(torch._grouped_mm(x_Nd, w_Edh, offs=offs_E))


def _gemm(a_Emk: torch.Tensor, b_Ekn: torch.Tensor, out: torch.Tensor, add: bool = False):
    """out (+)= a @ b per expert into `out` ([E, m, n] views): a batched GEMM, a plain one for
    a span of one expert (the loop path: one BLAS call per expert, and the GEMM that FLOP
    counters see as expert compute)."""
    if a_Emk.shape[0] == 1:
        a_Emk, b_Ekn, out = a_Emk[0], b_Ekn[0], out[0]
        return torch.addmm(out, a_Emk, b_Ekn, out=out) if add else torch.mm(a_Emk, b_Ekn, out=out)
    if add:
        return torch.baddbmm(out, a_Emk, b_Ekn, out=out)
    return torch.bmm(a_Emk, b_Ekn, out=out)


class _SwiGLUSpans(torch.autograd.Function):
    """Experts over rows sorted by expert, in spans (first expert, experts, first row, rows
    per expert): per span one batched GEMM each way over [E, C, d] views of the rows
    (expert choice: a group's experts take C rows each; the loop path: spans of one expert),
    written into preallocated buffers (no split/cat in the autograd graph, the expert
    weights' gradients written in place), with a hand-written backward.

    Only the GEMMs loop over spans: the SwiGLU elementwise work runs once over all rows, so
    many small experts cost no more elementwise passes than one big one, and the backward
    makes three (two products and the fused silu derivative, reusing the forward's silu) where
    the naive chain rule makes about ten. In the forward, gate and up projections are separate
    GEMMs (reading column halves of the stacked weight) into separate buffers: CPU elementwise
    kernels run faster on contiguous rows than on the column halves of one [N, 2h] product.
    In the backward their gradients sit side by side, as the weight's do: one GEMM each way.

    With `accumulate` (GroupedExperts.accumulate_grads) the weights' gradients are added into
    their `.grad` by the GEMM itself (beta = 1) and not returned, where `.grad` already holds
    a gradient (micro-batches after the first): one read and one write of the gradient instead
    of a fresh one written, read back and added by autograd's AccumulateGrad.
    """

    @staticmethod
    def forward(ctx, x_Nd, w_gate_up_Ed2h, w_down_Ehd, runs, accumulate=False):
        N, h, d = x_Nd.shape[0], w_down_Ehd.shape[1], w_down_Ehd.shape[2]
        g_Nh, u_Nh = x_Nd.new_empty(2, N, h).unbind(0)
        w_gate_Edh, w_up_Edh = w_gate_up_Ed2h[:, :, :h], w_gate_up_Ed2h[:, :, h:]
        view = lambda t, e0, E, n0, C: t[n0 : n0 + E * C].view(E, C, t.shape[1])
        for e0, E, n0, C in (span for span in runs if span[3]):
            x_ECd = view(x_Nd, e0, E, n0, C)
            _gemm(x_ECd, w_gate_Edh[e0 : e0 + E], out=view(g_Nh, e0, E, n0, C))
            _gemm(x_ECd, w_up_Edh[e0 : e0 + E], out=view(u_Nh, e0, E, n0, C))
        silu_Nh = F.silu(g_Nh)
        a_Nh = silu_Nh * u_Nh
        out_Nd = x_Nd.new_empty(N, d)
        for e0, E, n0, C in (span for span in runs if span[3]):
            a_ECh = view(a_Nh, e0, E, n0, C)
            _gemm(a_ECh, w_down_Ehd[e0 : e0 + E], out=view(out_Nd, e0, E, n0, C))
        ctx.save_for_backward(x_Nd, w_gate_up_Ed2h, w_down_Ehd, g_Nh, u_Nh, silu_Nh, a_Nh)
        ctx.runs = runs
        # The weights' gradient accumulators: the backward asks whether it runs them (not under
        # torch.autograd.grad, nor backward(inputs=...) without the weights) and reaches the
        # parameters through them (activation checkpointing saves detached copies).
        ctx.grad_nodes = (
            [get_gradient_edge(w).node for w in (w_gate_up_Ed2h, w_down_Ehd)] if accumulate else []
        )
        return out_Nd

    @staticmethod
    def backward(ctx, grad_Nd):
        # The forward's buffers are reused in place (each is read for the last time just
        # before it is overwritten): fresh activation-sized buffers cost page faults on
        # every step, which on CPUs can take as long as the elementwise work itself. A
        # second backward through the same graph fails loudly (saved tensors were modified).
        x_Nd, w_gu, w_down, g_Nh, u_Nh, silu_Nh, a_Nh = ctx.saved_tensors
        grad_Nd = grad_Nd.contiguous()
        h = a_Nh.shape[1]
        view = lambda t, e0, E, n0, C: t[n0 : n0 + E * C].view(E, C, t.shape[1])
        into = bool(ctx.grad_nodes) and all(map(_accumulates_into_grad, ctx.grad_nodes))
        if into:
            grad_gu, grad_down = (node.variable.grad for node in ctx.grad_nodes)
        else:
            grad_gu, grad_down = torch.empty_like(w_gu), torch.empty_like(w_down)
        for e0, E, n0, C in ctx.runs:
            if C:
                a_ECh, grad_ECd = view(a_Nh, e0, E, n0, C), view(grad_Nd, e0, E, n0, C)
                _gemm(a_ECh.transpose(1, 2), grad_ECd, out=grad_down[e0 : e0 + E], add=into)
                # a's rows of this run are read just above, then hold its gradient
                _gemm(grad_ECd, w_down[e0 : e0 + E].transpose(1, 2), out=a_ECh)
            elif not into:  # experts without rows (an empty group) get zero gradients
                grad_down[e0 : e0 + E].zero_()
                grad_gu[e0 : e0 + E].zero_()
        grad_a_Nh = a_Nh
        # The gate and up gradients side by side, as the stacked weight holds them: one GEMM
        # each way per span (K = 2h for the input's gradient), and the weight gradient written
        # whole (BLAS writes into the column halves of [E, d, 2h] several times slower).
        grad_gu_N2h = x_Nd.new_empty(x_Nd.shape[0], 2 * h)
        torch.mul(silu_Nh, grad_a_Nh, out=grad_gu_N2h[:, h:])
        grad_a_Nh.mul_(u_Nh)
        torch.ops.aten.silu_backward.grad_input(grad_a_Nh, g_Nh, grad_input=grad_gu_N2h[:, :h])
        grad_x = torch.empty_like(x_Nd)
        for e0, E, n0, C in ctx.runs:
            if C:
                dgu_EC2h = view(grad_gu_N2h, e0, E, n0, C)
                x_EdC = view(x_Nd, e0, E, n0, C).transpose(1, 2)
                _gemm(x_EdC, dgu_EC2h, out=grad_gu[e0 : e0 + E], add=into)
                _gemm(dgu_EC2h, w_gu[e0 : e0 + E].transpose(1, 2), out=view(grad_x, e0, E, n0, C))
        if into:  # already in .grad: autograd has nothing to add
            return grad_x, None, None, None, None
        return grad_x, grad_gu, grad_down, None, None


def _accumulates_into_grad(grad_node) -> bool:
    """Whether the backward may add a weight's gradient into its `.grad` in place: this
    backward runs the weight's accumulator (a backward(), not torch.autograd.grad), a gradient
    is there already (a later micro-batch), laid out as the weight, no graph is built, and no
    hook watches the gradient (DeepSpeed's ZeRO reads each micro-batch's in one)."""
    w = grad_node.variable
    g = w.grad
    if g is None or torch.is_grad_enabled():
        return False
    if g.shape != w.shape or g.dtype != w.dtype or g.device != w.device:
        return False
    if not g.is_contiguous() or g.requires_grad:
        return False
    if w._backward_hooks or getattr(w, "_post_accumulate_grad_hooks", None):
        return False
    try:
        return bool(torch._C._will_engine_execute_node(grad_node))
    except RuntimeError:  # torch.autograd.grad(..., w): the gradient is returned, not added
        return False


def _padded_swiglu(x_Nd, w_gate_up_Ed2h, w_down_Ehd, counts_E: torch.Tensor, max_count: int):
    """Experts as two batched GEMMs over rows padded to the busiest expert's count: one BLAS
    call each way instead of one per expert (the win for many small experts), at the cost
    of computing on padding (bounded by the caller's imbalance check)."""
    E, N = counts_E.numel(), x_Nd.shape[0]
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_Nd.device), counts_E, output_size=N)
    slot_N = expert_N * max_count + (torch.arange(N, device=x_Nd.device) - starts_E[expert_N])
    x_EMd = x_Nd.new_zeros(E * max_count, x_Nd.shape[1]).index_copy(0, slot_N, x_Nd)
    x_EMd = x_EMd.view(E, max_count, -1)
    gate_EMh, up_EMh = torch.bmm(x_EMd, w_gate_up_Ed2h).chunk(2, dim=-1)
    y_EMd = torch.bmm(F.silu(gate_EMh) * up_EMh, w_down_Ehd)
    return y_EMd.view(E * max_count, -1).index_select(0, slot_N)


class GroupedExperts(nn.Module):
    _said_misaligned = False  # the alignment fallback, said once a process
    # auto on a GPU without grouped GEMMs pads to the busiest expert while that costs at most
    # this much extra compute.
    MAX_PADDING = 2.0

    def __init__(self, num_experts: int, d_model: int, hidden: int, gemm: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden, self.gemm = num_experts, hidden, gemm
        # The global ids of these experts where they are some of a layer's (expert
        # parallelism, set from outside); None: all of them, in order.
        self.global_ids: list[int] | None = None
        # Set from outside (mm_moe/parallel) where the weights' gradients go to `.grad` and
        # nowhere else (ZeRO-0 with a torch optimizer: no hook watches AccumulateGrad): the
        # backward then adds them into `.grad` in its GEMMs (Megatron-LM's gradient
        # accumulation fusion). A backward that does not accumulate into `.grad`
        # (torch.autograd.grad) gets its gradients returned as always.
        self.accumulate_grads = False
        self._paths: dict = {}
        self.last_path: str | None = None  # the path the last forward took (tests, logs)
        # Gate and up projections side by side: one GEMM per expert instead of two.
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        for w in (self.w_gate_up, self.w_down):
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[1]))

    def path(self, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
        """(GEMM path, why) for inputs on this device and dtype; cached, but for the weights'
        alignment, which is checked each time (an optimizer may move them)."""
        key = (device, dtype)
        if key not in self._paths:
            _, hidden, d_model = self.w_down.shape
            self._paths[key] = choose_gemm(self.gemm, device, dtype, d_model, hidden)
        path, why = self._paths[key]
        misaligned = [w.data_ptr() % 16 for w in (self.w_gate_up, self.w_down)]
        if path == "grouped_mm" and any(misaligned):
            # torch._grouped_mm refuses (on CUDA) weights that do not start on a 16-byte
            # boundary: ZeRO makes the parameters views into one flat buffer, where a
            # parameter of an odd size before them (a QK-norm of head_dim 100) shifts them.
            path = "padded" if device.type == "cuda" else "loop"
            why = (
                f"{why}, but the expert weights start {misaligned[0] or misaligned[1]} bytes "
                "past a 16-byte boundary (views into the optimizer's flat buffer), which "
                f"torch._grouped_mm refuses: {path} GEMMs instead"
            )
            if not GroupedExperts._said_misaligned:  # once a process, not a layer
                GroupedExperts._said_misaligned = True
                log.warning("moe.gemm: %s (said once for every layer)", why)
        return path, why

    def forward_runs(self, x_Nd: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """Rows sorted by expert in runs of (experts, rows per expert), counts the host knows
        (expert choice: a group's experts take C rows each): no counts on the device and no
        host sync; a batched GEMM per run of equal counts, or one grouped GEMM."""
        path, _ = self.path(x_Nd.device, x_Nd.dtype)
        if path == "grouped_mm" and x_Nd.device.type != "cuda" and self.gemm == "auto":
            path = "loop"  # batched GEMMs over equal counts beat the CPU grouped kernel
        self.last_path = path
        if path == "grouped_mm":
            ends, total = [], 0
            for E, C in runs:
                for _ in range(E):
                    total += C
                    ends.append(total)
            offs_E = host_to_device(ends, x_Nd.device, torch.int32)
            gate_Nh, up_Nh = _grouped_mm(x_Nd, self.w_gate_up, offs_E).chunk(2, dim=1)
            return _grouped_mm(F.silu(gate_Nh) * up_Nh, self.w_down, offs_E)
        spans: list[tuple[int, int, int, int]] = []
        e0 = n0 = 0
        for E, C in runs:
            if spans and spans[-1][3] == C:  # equal counts: one batched GEMM for both
                pe0, pE, pn0, _ = spans[-1]
                spans[-1] = (pe0, pE + E, pn0, C)
            else:
                spans.append((e0, E, n0, C))
            e0, n0 = e0 + E, n0 + E * C
        assert e0 == self.num_experts and n0 == len(x_Nd), (runs, self.num_experts, len(x_Nd))
        return _SwiGLUSpans.apply(
            x_Nd, self.w_gate_up, self.w_down, tuple(spans), self._accumulates()
        )

    def _accumulates(self) -> bool:
        """Accumulate into `.grad` in the backward: set from outside, and a graph is being
        built for trained weights (not under no_grad or inference_mode, nor frozen experts)."""
        trained = self.w_gate_up.requires_grad and self.w_down.requires_grad
        return self.accumulate_grads and torch.is_grad_enabled() and trained

    def loop_accumulates(self, device: torch.device) -> bool:
        """moe.gemm=auto on CPU, where the weights' gradients accumulate in place: the loop
        (whose backward adds them into `.grad` in its GEMMs; torch._grouped_mm's backward
        cannot) rather than the grouped GEMM. On CPU reading the counts costs no sync.
        scripts/bench_step.py, MoMa token choice at d=512: 1.35x dense against 1.56x."""
        return device.type == "cpu" and self.gemm == "auto" and self.accumulate_grads

    def forward(
        self, x_Nd: torch.Tensor, counts_E: torch.Tensor, counts: list[int] | None = None
    ) -> torch.Tensor:
        """counts: counts_E as the host already has it (else read: a host sync, unless the
        grouped GEMM takes them on the device)."""
        path, _ = self.path(x_Nd.device, x_Nd.dtype)
        if path == "grouped_mm" and torch.is_grad_enabled() and self.loop_accumulates(x_Nd.device):
            path = "loop"
        self.last_path = path
        if path == "grouped_mm":
            offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)  # once for both GEMMs
            gate_Nh, up_Nh = _grouped_mm(x_Nd, self.w_gate_up, offs_E).chunk(2, dim=1)
            return _grouped_mm(F.silu(gate_Nh) * up_Nh, self.w_down, offs_E)
        counts = counts_E.tolist() if counts is None else counts
        max_count = max(counts) if counts else 0
        # On a GPU one batched GEMM beats a launch per expert, unless padding to the busiest
        # expert more than doubles the work; on a CPU the loop is faster (no work on padding,
        # and the elementwise work already runs once over all rows).
        padded = path == "padded" and (
            self.gemm == "padded" or max_count * len(counts) <= self.MAX_PADDING * len(x_Nd)
        )
        if padded and max_count > 0:
            return _padded_swiglu(x_Nd, self.w_gate_up, self.w_down, counts_E, max_count)
        # The loop: a span of one expert per expert (no padding, one GEMM each way per expert).
        starts = [0, *itertools.accumulate(counts)]
        spans = tuple((e, 1, starts[e], C) for e, C in enumerate(counts))
        return _SwiGLUSpans.apply(x_Nd, self.w_gate_up, self.w_down, spans, self._accumulates())


LOOP_ACCUMULATES = (
    "moe.gemm=auto on CPU with gradients accumulated in place (ZeRO-0): a loop of GEMMs over "
    "uneven counts, whose backward adds into .grad; batched GEMMs for equal counts"
)


def gemm_paths(model: nn.Module, device: torch.device) -> dict[str, str]:
    """{GEMM path: why} that the model's expert layers take for their weights' dtype on
    `device` (one entry when all agree). Raises the UserError of a forced path that cannot
    run, before the first step."""
    paths = {}
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            path, why = m.path(device, m.w_down.dtype)
            if path == "grouped_mm" and m.loop_accumulates(device):
                path, why = "loop", LOOP_ACCUMULATES
            paths[path] = why
    return paths
