"""trainer.profile=START:END: a torch.profiler trace of those optimizer steps in the run
directory, in Chrome's trace-event JSON (which TensorBoard's profiler plugin reads)."""

from __future__ import annotations

import json

import pytest

from mm_moe.cli import compose
from mm_moe.errors import UserError
from tests.helpers import metrics, train


def test_profile_writes_a_trace_of_the_requested_steps(tmp_path):
    """A window that ends after trainer.max_steps is warned about and named by the steps the
    trace holds."""
    proc = train(tmp_path, "trainer.max_steps=4", "trainer.profile=3:9", "checkpoint.interval=0")
    assert "ends after trainer.max_steps=4: steps 3-4 profiled" in proc.stdout + proc.stderr
    assert len(metrics(tmp_path)) == 4
    traces = sorted((tmp_path / "profile").iterdir())
    assert [p.name for p in traces] == ["rank0_steps3-4.pt.trace.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#3", "ProfilerStep#4"]  # those steps, and only those
    names = {e.get("name") for e in events}
    assert {"aten::mm", "aten::scaled_dot_product_attention"} & names  # the model's ops
    assert any(n and "backward" in n.lower() for n in names)  # and its backward


@pytest.mark.parametrize("value", ["3", "0:2", "5:3", "a:b", "2:"])
def test_bad_profile_window_is_a_user_error_naming_the_key(value):
    with pytest.raises(UserError, match=r"trainer\.profile=.* must be START:END"):
        compose([f"trainer.profile={value}"])
    assert compose(["trainer.profile=2:2"]).trainer.profile_steps() == (2, 2)
