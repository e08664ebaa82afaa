"""mm_moe.parallel.megatron_state: parallel_state without megatron/core/__init__.py, and the
package whole for whoever asks for more of it."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_parallel_state_skips_the_package_init_until_something_else_is_asked_for():
    out = _run(
        """
        import sys
        from mm_moe.parallel.megatron_state import parallel_state

        mpu = parallel_state()
        assert callable(mpu.initialize_model_parallel)
        assert "megatron.core.tensor_parallel" not in sys.modules, "the package __init__ ran"
        from megatron.core import utils  # a submodule: still no __init__
        assert "megatron.core.tensor_parallel" not in sys.modules

        import megatron.core
        assert megatron.core.ModelParallelConfig  # a name of the __init__: it runs now
        assert "megatron.core.tensor_parallel" in sys.modules
        assert megatron.core.parallel_state is mpu and megatron.core.mpu is mpu
        assert parallel_state() is mpu  # the package is imported now: used as it is
        print("ok")
        """
    )
    assert out.strip().endswith("ok")
