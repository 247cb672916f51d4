"""Every preset on a real local Ray against the same run in process: one
builder, two placements, a stop and a resume in between."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ray_tiny import PRESET_TINY, _tiny_cfg, sets

from dqd_ray.cli import main
from dqd_ray.config import PRESETS, build_config
from dqd_ray.loop import read_metrics
from dqd_ray.state import checkpoint as ckpt

pytestmark = pytest.mark.slow


def test_every_preset_has_tiny_settings():
    assert set(PRESET_TINY) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESET_TINY))
def test_each_preset_runs_resumes_and_matches_in_process(ray_session, tmp_path, preset):
    """One builder, two placements: every preset run on Ray actors with the CLI,
    stopped after 2 iterations and resumed to 3, gives in sync mode the metrics
    and the archive of an uninterrupted in-process run of the same seed."""
    from dqd_ray.runtime import System

    extra = ("resources.learner_mode=sync", "resources.torch_threads=1",
             "metrics.robustness_every=2", "resources.num_rollout_workers=1")
    local = System(_tiny_cfg(*extra, preset=preset), "inprocess")
    local_metrics = [local.iteration() for _ in range(3)]
    local_archive = local.archive()
    local.close()

    out = tmp_path / "run"
    assert main(["run", "--preset", preset, "--out", str(out),
                 *sets("iterations=2", *extra, preset=preset)]) == 0
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["ckpt_0000002"]
    assert main(["resume", str(out), "--set", "iterations=3"]) == 0
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    cfg = build_config(file=out / "config.yaml")
    from dqd_ray.loop import reported_metrics

    for m in metrics:
        assert reported_metrics(cfg) <= set(m), reported_metrics(cfg) - set(m)
        assert m["rollout_workers_compiled"] == 1  # its Ray actor steps the envs in C
    for a, b in zip(metrics, local_metrics):
        for key in ("qd_score", "env_steps", "evaluations", "greedy_fitness", "robustness",
                    "worst_fitness", "mean_evaluation", "num_elites", "critic_updates"):
            assert a.get(key) == b.get(key), (a["iteration"], key)
    assert metrics[-1]["num_elites"] > metrics[0]["num_elites"] > 0
    if cfg.uses_td3:
        assert metrics[-1]["critic_updates_total"] > 0
        assert metrics[-1]["critic_loss"] == pytest.approx(local_metrics[-1]["critic_loss"])
    else:
        assert "critic_loss" not in metrics[-1] and metrics[-1]["critic_updates_total"] == 0
    names = [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert names == ["ckpt_0000002", "ckpt_0000003"]  # every 2, and at the end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["iteration"] == 3
    assert (out / "config.yaml").exists() and (out / "archive.png").exists()
    with np.load(out / "checkpoints" / "ckpt_0000003" / "archive.npz") as saved:
        ray_archive = {k: saved[k] for k in ("index", "objective", "solution")}
    order_r, order_l = np.argsort(ray_archive["index"]), np.argsort(local_archive["index"])
    for key in ("index", "objective", "solution"):
        np.testing.assert_array_equal(ray_archive[key][order_r], local_archive[key][order_l])
