"""What the package layout promises: the light parts stay light (a config, a
rollout worker and its replay sink import neither pyribs nor torch: each Ray
worker process pays only for what it runs), and classes that moved keep
loading from checkpoints written before the move."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dqd_ray import algorithms
from dqd_ray.algorithms import BuildContext
from dqd_ray.config import build_config
from dqd_ray.state import statecodec

HEAVY = ("ribs", "torch", "sklearn", "pandas")


@pytest.mark.parametrize("modules", [
    "dqd_ray.config",  # every process that unpickles a config or validates one
    "dqd_ray.roles.rollout, dqd_ray.roles.replay_actor, dqd_ray.runtime.waits",  # a worker
    "dqd_ray.runtime",  # the package itself: its names load on first use
])
def test_light_modules_import_neither_pyribs_nor_torch(modules):
    code = (f"import sys, {modules}\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert out == "[]", f"{modules} imported {out}"


def _scheduler(preset: str, seed: int = 1):
    cfg = build_config(preset, sets=["env.id=QDHopperBulletEnv-v0", "policy.hidden_sizes=[4]"])
    ctx = BuildContext(solution_dim=20, x0=np.zeros(20), archive_dims=[10],
                       archive_ranges=[(0.0, 1.0)], qd_offset=-100.0,
                       seed_sequence=np.random.SeedSequence(seed), policy_first_layer=(3, 4))
    return algorithms.get(cfg.algorithm.name).build_scheduler(cfg.algorithm, ctx)


def _rename(tree, old: str, new: str):
    text = json.dumps(tree)
    assert f'"{old}"' in text
    return json.loads(text.replace(f'"{old}"', f'"{new}"'))


@pytest.mark.parametrize("preset,moved", [
    ("map_elites", ("dqd_ray.algorithms.scheduler.MaskedScheduler",
                    "dqd_ray.algorithms.base.MaskedScheduler")),
    ("pga_me", ("dqd_ray.algorithms.pga_me_emitter.PolicyGradientEmitter",
                "dqd_ray.algorithms.pga_me.PolicyGradientEmitter")),
])
def test_a_class_that_moved_loads_under_its_old_name(preset, moved):
    new, old = moved
    sched = _scheduler(preset)
    sched.ask()  # some state beyond the fresh one
    tree, arrays = statecodec.encode(sched)
    restored = statecodec.restore(_scheduler(preset), _rename(tree, new, old), arrays)
    assert type(restored) is type(sched)
    # A name that never existed is still refused.
    with pytest.raises(statecodec.StateError, match="not in the checkpoint allowlist"):
        statecodec.restore(_scheduler(preset), _rename(tree, new, old + "Nope"), arrays)
