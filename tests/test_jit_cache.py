"""pyribs' numba helpers are compiled once per machine, not once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# A fresh process runs one ask and tell of each of pyribs' three ES engines
# (what docker/Dockerfile runs to fill the image's cache), then reports, per
# jitted helper, numba's cache hits and misses.
PROBE = r"""
import importlib, json
from numba.core.dispatcher import Dispatcher
from dqd_ray.algorithms.scheduler import warm_pyribs_jit

on = warm_pyribs_jit()
stats = {}
for name in on:
    mod, cls, fn = name.rsplit(".", 2)
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
    assert len(used) >= 6, first["stats"]  # most helpers run in one ask and tell
    assert all(first["stats"][n] == [0, 1] for n in used)  # compiled, once each
    assert list(tmp_path.rglob("*.nbi")) and list(tmp_path.rglob("*.nbc"))
    second = _probe(tmp_path)
    for n in used:  # loaded, not compiled again
        assert second["stats"][n] == [1, 0], (n, second["stats"][n])
