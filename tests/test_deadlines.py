"""Every wait has a deadline: a wedged role or a graph that cannot be placed
ends the run in time, with a message naming the role, the call and the node.

A role is wedged the way a silent node wedges it: its process is stopped
(SIGSTOP), alive to Ray but answering nothing. The multi-node cases (a bundle
no single node holds, an actor that cannot be restarted) run on a
``ray.cluster_utils.Cluster`` in a subprocess (tests/deadline_cluster.py),
apart from the session's Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dqd_ray.config import ConfigError, build_config
from dqd_ray.loop import Experiment, read_metrics
from dqd_ray.state import checkpoint as ckpt

pytestmark = pytest.mark.slow

CALL_TIMEOUT_S = 3.0
TINY = [
    "env.episode_length=30", "td3.batch_size=16", "td3.critic_hidden_sizes=[16,16]",
    "td3.train_steps_per_iteration=3", "td3.jacobian_states=16", "td3.learning_starts=16",
    "td3.replay_capacity=5000", "algorithm.batch_size=3", "resources.num_rollout_workers=1",
    "resources.envs_per_worker=1", "resources.learner_mode=sync", "resources.torch_threads=1",
    "checkpoint.every=1", "logging.progress_bar=false", "logging.final_gif=false",
    f"resources.call_timeout_s={CALL_TIMEOUT_S}", "iterations=6",
]


def test_call_timeout_is_validated():
    with pytest.raises(ConfigError, match="call_timeout_s"):
        build_config("cma_mega_td3", sets=["resources.call_timeout_s=0"])
    assert build_config("cma_mega_td3").resources.call_timeout_s >= 300  # generous default


class _StopAfter:
    """A metrics sink that stops (SIGSTOP) one role's process after iteration 1."""

    def __init__(self, pid_of):
        self.pid_of, self.pid, self.t_stop = pid_of, None, None

    def wants_archive(self, iteration: int) -> bool:
        return False

    def log(self, m, archive, checkpoint=None) -> None:
        if m["iteration"] == 1 and self.pid is None:
            self.pid = self.pid_of()
            os.kill(self.pid, signal.SIGSTOP)
            self.t_stop = time.monotonic()

    def close(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("role", ["rollout worker 0", "the replay buffer", "the coordinator"])
def test_a_wedged_role_stops_the_run_in_time_naming_role_call_and_node(
        ray_session, tmp_path, monkeypatch, role):
    from dqd_ray import loop
    from dqd_ray.runtime.waits import actor_id_of, actor_info

    built = {}
    make = loop.make_system

    def capture(*a, **kw):
        built["system"] = make(*a, **kw)
        return built["system"]

    monkeypatch.setattr(loop, "make_system", capture)

    def pid_of():
        s = built["system"]
        handle = {"rollout worker 0": s.workers[0], "the replay buffer": s.replay,
                  "the coordinator": s.coordinator}[role]
        return actor_info(actor_id_of(handle))["pid"]

    stopper = _StopAfter(pid_of)
    # The replay's callers give it a quarter of the deadline; 8 s leaves the
    # 2 s of its own deadline 6 s to fire before its callers' on a busy machine.
    timeout = 8.0 if role == "the replay buffer" else CALL_TIMEOUT_S
    cfg = build_config("cma_mega_td3", sets=[*TINY, f"resources.call_timeout_s={timeout}"])
    exp = Experiment.create(cfg, tmp_path / "run", backend="ray")
    with pytest.raises(Exception) as info:
        exp.run(sinks=[stopper])
    waited = time.monotonic() - stopper.t_stop
    msg = str(info.value)
    print(f"\n{role}: stopped the run {waited:.1f} s after SIGSTOP: {msg}")
    assert role in msg, msg
    # A stopped replay buffer is found by whoever calls it first: a worker's
    # add, the coordinator's commit of the staged transitions or a sample.
    calls = {"rollout worker 0": ["evaluate_indices()"], "the coordinator": ["heartbeat()"],
             "the replay buffer": ["add()", "commit()", "sample()", "size()"]}[role]
    assert any(c in msg for c in calls), msg
    assert "node " in msg and "node unknown" not in msg, msg
    assert "call_timeout_s" in msg, msg
    # The deadline, plus the liveness ping for the coordinator, plus slack for
    # a busy 2-core machine; far below "forever".
    assert waited < 2 * timeout + 20, waited
    # The last checkpoint stays the resume point and the failed iteration left
    # neither a checkpoint nor a metrics line.
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == \
        ["ckpt_0000001"]
    ckpt.verify(tmp_path / "run" / "checkpoints" / "ckpt_0000001")
    assert [m["iteration"] for m in read_metrics(tmp_path / "run")] == [1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failed"] and role in summary["error"]


def test_bundles_that_fit_only_in_total_are_found():
    from dqd_ray.runtime.resources import _homeless

    nodes = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert _homeless([{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}], nodes) == []
    assert _homeless([{"CPU": 3.0}, {"CPU": 3.0}, {"GPU": 2.0}], nodes) == \
        [{"CPU": 3.0}, {"GPU": 2.0}]
    assert _homeless([{"rollout": 1.0}], nodes) == [{"rollout": 1.0}]


def _cluster(scenario: str, timeout: float = 240) -> dict:
    script = Path(__file__).with_name("deadline_cluster.py")
    proc = subprocess.run([sys.executable, str(script), scenario], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cluster_deadlines_oversized_bundle_and_unplaceable_restart():
    """Two 1-CPU nodes: a 2-CPU worker fits the totals but no node, and is
    refused at once; a worker whose only node is removed cannot be restarted
    and stops its evaluation after ``wait_for_resources_s``."""
    out = _cluster("all")
    big = out["oversized"]
    assert big["error"] == "ResourceError" and "no single node" in big["message"], big
    assert big["seconds"] < 20, big  # wait_for_resources_s=2 plus the checks
    lost = out["restart"]
    assert lost["error"] == "CallTimeoutError", lost
    assert "rollout worker 0" in lost["message"] and "wait_for_resources_s" in lost["message"]
    assert "RESTARTING" in lost["message"] or "PENDING" in lost["message"], lost
    # wait_for_resources_s=3 after the restart was first seen, one 5 s poll
    # to see it, slack for a busy machine.
    assert lost["seconds"] < 40, lost
