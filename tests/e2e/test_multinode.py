"""launch/torchrun.sh as two nodes on localhost (NNODES=2, one process each, c10d rendezvous)
trains the same job as one node with two processes: the same losses."""

from __future__ import annotations

import os
import subprocess

from tests.helpers import PYTHON, REPO, TINY, _env, free_port, losses, train

JOB = ["experiment=tiny_moma", "parallel.expert_parallel_size=2", "trainer.max_steps=4"]


def test_two_nodes_on_localhost_equal_one_node_with_two_processes(tmp_path):
    one_node = tmp_path / "one"
    train(one_node, *JOB, nproc=2)

    two_nodes = tmp_path / "two"
    port = free_port()
    args = [*TINY, f"trainer.run_dir={two_nodes}", *JOB]
    nodes = []
    for rank in (0, 1):
        env = {
            **_env(),
            "PYTHON_BIN": PYTHON,
            "NNODES": "2",
            "NODE_RANK": str(rank),
            "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), *args]
        nodes.append(
            subprocess.Popen(
                cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = [node.communicate(timeout=300)[0].decode() for node in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-4000:]
    assert "world size 2, expert parallel 2" in outputs[0]
    assert losses(two_nodes) == losses(one_node)
    assert os.path.isfile(two_nodes / "metrics.jsonl")
