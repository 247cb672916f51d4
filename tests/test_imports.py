"""What a process pays to import: pyribs without torch where torch is not used
(dqd_ray._pyribs). Each case runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_the_coordinator_module_imports_pyribs_without_torch_and_torch_still_imports():
    out = _run(
        "import sys, dqd_ray.roles.coordinator, dqd_ray.runtime.learners, ribs.typing\n"
        "print('torch' in sys.modules, ribs.typing.IS_TORCH_AVAILABLE)\n"
        "import torch\n"
        "print(float(torch.ones(3).sum()))\n")
    assert out.splitlines() == ["False False", "3.0"]


def test_a_process_that_loaded_torch_first_gets_pyribs_unchanged():
    out = _run("import torch, dqd_ray, ribs.typing\nprint(ribs.typing.IS_TORCH_AVAILABLE)")
    assert out == "True"


def test_a_driver_imports_no_pyribs_until_it_needs_an_archive():
    """A run's driver (and a Tune trial) builds the graph and writes
    checkpoints without pyribs; QD Ant's 4-D heatmap needs none either."""
    out = _run("import sys, dqd_ray.cli, dqd_ray.loop, dqd_ray.runtime.builder, "
               "dqd_ray.sweeps.trial, dqd_ray.analysis.viz\n"
               "print('ribs' in sys.modules)")
    assert out == "False"
