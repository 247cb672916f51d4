"""pyribs' numba helpers are compiled once per machine, not once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# A fresh process: pyribs' CMA-ES (CMA-MEGA's engine) asks and tells once, then
# the process reports, per jitted helper, numba's cache hits and misses.
PROBE = r"""
import json
import numpy as np
from numba.core.dispatcher import Dispatcher
from dqd_ray.algorithms.scheduler import cache_pyribs_jit
from ribs.emitters.opt import _cma_es, _lm_ma_es, _sep_cma_es

on = cache_pyribs_jit()
for cls in (_cma_es.CMAEvolutionStrategy,):
    es = cls(sigma0=0.3, solution_dim=10, batch_size=8, seed=1)
    es.reset(np.zeros(10))
    sols = es.ask()
    order = np.argsort(-sols.sum(axis=1))
    es.tell(order, sols.sum(axis=1)[order], num_parents=4)
    assert np.isfinite(es.ask()).all()
stats = {}
for name in on:
    mod, cls, fn = name.rsplit(".", 2)
    import importlib
    d = getattr(getattr(importlib.import_module(mod), cls), fn)
    assert isinstance(d, Dispatcher)
    stats[name] = [sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())]
print(json.dumps({"on": on, "stats": stats}))
"""


def _probe(cache_dir) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pyribs_jit_helpers_are_compiled_by_the_first_process_and_loaded_by_the_next(tmp_path):
    first = _probe(tmp_path)
    # Every jitted helper of the three engines has its cache on.
    assert len(first["on"]) == 8, first["on"]
    used = {n for n, (hits, misses) in first["stats"].items() if hits + misses}
    assert len(used) == 2, first["stats"]  # CMA-ES's two helpers ran
    assert all(first["stats"][n] == [0, 1] for n in used)  # compiled, once
    assert list(tmp_path.rglob("*.nbi")) and list(tmp_path.rglob("*.nbc"))
    second = _probe(tmp_path)
    for n in used:  # loaded, not compiled again
        hits, misses = second["stats"][n]
        assert hits >= 1 and misses == 0, (n, second["stats"][n])
