"""The warning before a CPU run whose weights, gradients and Adam state exceed free memory."""

import torch

from mm_moe.model.config import ModelConfig
from mm_moe.trainer import host_memory


def test_a_cpu_run_beyond_free_memory_is_warned_about(monkeypatch, caplog):
    model = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1).build()
    params = sum(p.numel() for p in model.parameters())
    need = params * host_memory.BYTES_PER_PARAMETER
    cpu = torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 2 * need + 1)
    with caplog.at_level("WARNING"):
        host_memory.warn_if_beyond_host_memory(model, cpu)
    assert "killed for memory" not in caplog.text
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 2 * need - 1)
    with caplog.at_level("WARNING"):
        host_memory.warn_if_beyond_host_memory(model, torch.device("cuda"))  # GPUs: not here
        assert "killed for memory" not in caplog.text
        host_memory.warn_if_beyond_host_memory(model, cpu)
    assert "for 2 process(es) on this machine" in caplog.text
    assert "the run will likely be killed for memory" in caplog.text
    monkeypatch.undo()
    free = host_memory.available_bytes()  # the real reader, on Linux a number
    assert free is None or 0 < free < 2**50
