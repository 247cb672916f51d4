"""Faults on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster).

The scenarios run through ``dqd-ray bench faults`` in a subprocess: its
cluster is a separate Ray from the one the rest of the suite shares. See
:mod:`dqd_ray.bench.faults` for what each scenario injects.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ITERATIONS = 8


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    proc = subprocess.run(
        [sys.executable, "-m", "dqd_ray.cli", "bench", "faults", "--iterations", str(ITERATIONS),
         "--out", str(out / "work"), "--json", str(out / "faults.json"), "--timeout", "240"],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "faults.json").read_text())


def test_rollout_learner_and_replay_nodes_removed_mid_run(report):
    r = report["nodes"]
    assert [e["removed"] for e in r["events"]] == ["rollout node", "learner node", "replay node"]
    # The run completed: every iteration once, evaluations exactly the budget
    # the config implies (theta + 4 branches + the greedy actor, 8 iterations).
    assert r["iterations_unique"], r["iterations"]
    assert r["evaluations_budget"] == 6 * ITERATIONS
    assert r["evaluations_per_iteration"] == [6]  # none lost or counted twice
    assert r["evaluations"] == r["evaluations_budget"]
    # Restartable actors get only small constructor arguments (ray#53727).
    assert r["restart_argument_warnings"] == 0
    assert r["deprecation_warnings"] == 0
    for scenario in ("nodes", "driver", "wait", "checkpoint"):
        assert report[scenario]["restart_argument_warnings_all_logs"] == 0, scenario
    # The rollout worker of the removed node restarted elsewhere.
    assert r["worker_restarts"] >= 1
    # The archive never lost an elite.
    assert r["elites_never_decrease"], r["num_elites"]
    # Every checkpoint written was seen (the watcher looks while it waits),
    # less any skipped because a role restarted between capture and write.
    assert r["checkpoints_compared"] >= 2 and r["elites_lost"] == 0
    assert r["checkpoints_compared"] + r["checkpoints_skipped"] >= 3, r
    assert r["elites_lost_between_checkpoints"] == 0
    # The learner restarted on the new node with the snapshot's critics: its
    # update count continues from the snapshot instead of starting again at 0.
    assert r["learner_restarts"] == 1
    assert "restored the critics of iteration" in r["learner_restore_line"]
    assert r["critic_updates_restored"] > 0
    assert r["critic_updates_after_restore"] >= r["critic_updates_restored"]
    # The newest snapshot before the loss (snapshots every 2 iterations).
    learner_it = r["events"][1]["after_iteration"]
    assert learner_it - 2 < r["learner_restored_iteration"] <= learner_it
    # On one fixed buffer batch, the restored critics' loss is the snapshot's
    # (the same weights), far from the restarted learner's fresh critics.
    snap, restored, fresh = (r["probe_loss_snapshot"], r["probe_loss_restored"],
                             r["probe_loss_fresh"])
    assert abs(restored - snap) <= 1e-5 * max(1.0, abs(snap))
    assert abs(fresh - snap) > 1e-3 * max(1.0, abs(snap))
    # The replay buffer restarted and reloaded the newest checkpoint's data.
    assert r["replay_restarts"] == 1
    line = r["replay_reload_line"]
    assert line and "from ckpt_" in line
    reloaded = int(line.split("reloaded ")[1].split()[0])
    assert reloaded > 0
    assert r["replay_size_after_reload"] >= reloaded


def test_driver_sigkill_then_resume(report):
    r = report["driver"]
    assert r["resumed_from_iteration"] >= 2
    assert r["resume_line"].startswith("resumed from")
    assert r["resumed_from_checkpoint"] in r["resume_line"]
    assert r["resumed_from_iteration"] <= r["killed_after_iteration"]
    # The resumed archive holds every elite of the checkpoint from its first iteration.
    assert r["elites_first_iteration_after_resume"] >= r["checkpoint_elites"]
    assert r["iterations_unique"], r["iterations"]
    assert r["checkpoint_elites"] > 0 and r["elites_lost"] == 0


def test_joining_a_cluster_waits_for_resources_then_fails_or_starts(report):
    r = report["wait"]
    # Never offered: exit code 2 and a message naming the resource, after the wait.
    assert r["missing_resource_rc"] == 2
    assert "never_offered 1 (has 0)" in r["missing_resource_error"]
    assert "after waiting 4 s" in r["missing_resource_error"]
    assert r["missing_resource_failed_after_s"] >= 4
    # Offered by a node that joins during the wait: the run starts and finishes.
    assert "late_learner 1 needed, 0 now" in r["late_resource_waiting_line"]
    # The autoscaler was asked for the graph's bundles (node types with
    # min_workers 0 start only on demand), the missing resource among them.
    assert "late_learner" in r["late_resource_autoscaler_line"]
    assert r["late_resource_iterations"] == [1, 2]


def test_crash_while_writing_a_checkpoint(report):
    r = report["checkpoint"]
    assert r["crash_rc"] == -9  # SIGKILL while writing ckpt 4
    assert any(n.startswith(".tmp_ckpt_0000004") for n in r["left_after_crash"])
    assert "ckpt_0000004" not in r["left_after_crash"]
    assert r["readable_after_crash"] == "ckpt_0000002"
    assert r["iterations_unique"], r["iterations"]
    # The next checkpoint write removed the half-written directory.
    assert not any(n.startswith(".tmp") for n in r["left_after_resume"])
