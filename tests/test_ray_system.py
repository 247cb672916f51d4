"""The distributed system on a real local Ray (started once per session)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ray_tiny import _tiny_cfg, sets

from dqd_ray.cli import main
from dqd_ray.config import ConfigError, build_config
from dqd_ray.loop import Experiment, read_metrics
from dqd_ray.state import checkpoint as ckpt

pytestmark = pytest.mark.slow


def test_killed_rollout_worker_loses_and_duplicates_nothing(ray_session):
    import ray

    from dqd_ray.roles.policy import PolicySpec
    from dqd_ray.runtime import System

    cfg = _tiny_cfg("env.id=QDHalfCheetahBulletEnv-v0", "env.episode_length=1000",
                    "resources.envs_per_worker=1")
    system = System(cfg, "ray")
    ev = system.evaluator
    ev.chunk = 1
    spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
    rng = np.random.default_rng(0)
    genomes = np.stack([spec.init_genome(rng) for _ in range(24)])
    seeds = np.arange(24)
    reference = ev.evaluate(genomes, seeds)

    result = {}
    thread = threading.Thread(target=lambda: result.update(ev.evaluate(genomes, seeds)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive(), "the evaluation finished before the kill: make it longer"
    ray.kill(system.workers[0], no_restart=False)
    thread.join(timeout=300)
    assert result, "evaluation did not finish after the worker was killed"
    assert result["valid"].all()
    np.testing.assert_array_equal(result["fitness"], reference["fitness"])
    np.testing.assert_array_equal(result["length"], np.full(24, 1000))
    assert result["env_steps"] == reference["env_steps"] == 24 * 1000
    # The restarted worker is usable again.
    again = ev.evaluate(genomes[:4], seeds[:4])
    np.testing.assert_array_equal(again["fitness"], reference["fitness"][:4])
    system.close()


def test_replay_actor_many_concurrent_producers(ray_session):
    import ray

    from dqd_ray.roles.replay import ReplayBuffer

    capacity = 50_000
    replay = ray.remote(num_cpus=0)(ReplayBuffer).remote(3, 2, 2, capacity, seed=0)

    @ray.remote(num_cpus=0)
    def produce(replay, producer: int, chunks: int, size: int):
        from dqd_ray.roles.replay_actor import ReplaySink

        sink = ReplaySink(replay, max_in_flight=2)
        for c in range(chunks):
            ids = producer * 1_000_000 + c * size + np.arange(size)
            sink({"obs": np.repeat(ids[:, None], 3, 1).astype(np.float32),
                  "action": np.zeros((size, 2), np.float32),
                  "reward": np.zeros((size, 2), np.float32),
                  "next_obs": np.zeros((size, 3), np.float32),
                  "terminated": np.zeros(size, np.float32)})
        sink.drain()
        return chunks * size

    sent = sum(ray.get([produce.remote(replay, p, 10, 500) for p in range(8)]))
    stats = ray.get(replay.stats.remote())
    assert sent == stats["size"] == stats["total_added"] == 40_000
    data = ray.get(replay.state_dict.remote())["data"]["obs"][:, 0]
    assert len(np.unique(data)) == 40_000  # nothing lost, nothing duplicated
    assert stats["memory_bytes"] == capacity * 4 * (3 + 2 + 2 + 3 + 1)
    # Past capacity: memory stays fixed, the newest transitions are kept.
    ray.get([produce.remote(replay, p, 10, 500) for p in range(8, 12)])
    stats = ray.get(replay.stats.remote())
    assert stats["size"] == capacity and stats["memory_bytes"] == capacity * 4 * 11


def test_keyed_episodes_reach_the_buffer_in_key_order_whatever_the_batching(ray_session):
    import ray

    from dqd_ray.roles.replay import ReplayBuffer
    from dqd_ray.roles.replay_actor import ReplaySink

    def piece(start: int, n: int) -> dict:
        ids = np.arange(start, start + n, dtype=np.float32)
        return {"obs": np.repeat(ids[:, None], 3, 1), "action": np.zeros((n, 2), np.float32),
                "reward": np.zeros((n, 2), np.float32), "next_obs": np.zeros((n, 3), np.float32),
                "terminated": np.zeros(n, np.float32)}

    rng = np.random.default_rng(0)
    episodes = [((int(g), 0), piece(100 * int(g), int(rng.integers(5, 60))))
                for g in rng.permutation(40)]
    reference = ReplayBuffer(3, 2, 2, 10_000, seed=0)
    for key, c in episodes:
        reference.add(c, key=key)
    reference.commit()
    for batch_rows in (1, 150, 10_000):  # one call per episode, a few, one in all
        replay = ray.remote(num_cpus=0)(ReplayBuffer).remote(3, 2, 2, 10_000, seed=0)
        sink = ReplaySink(replay, batch_rows=batch_rows)
        for key, c in episodes:
            sink(c, key=key)
        sink.drain()
        assert not sink._keyed and not sink._pending  # everything sent and received
        assert ray.get(replay.commit.remote()) == len(reference)
        got = ray.get(replay.state_dict.remote())["data"]
        np.testing.assert_array_equal(got["obs"], reference.state_dict()["data"]["obs"])
        ray.kill(replay)


def test_short_episodes_go_in_bigger_calls_and_change_no_result(ray_session):
    """After a batch of short episodes the evaluator sends more genomes a call
    (fewer calls), and the episodes, their results and the committed replay
    data are those of 4-genome calls: keyed transitions, one seed per genome."""
    import ray

    from dqd_ray.envs import env_metadata
    from dqd_ray.roles.policy import PolicySpec
    from dqd_ray.roles.replay import ReplayBuffer
    from dqd_ray.roles.replay_actor import ReplaySink
    from dqd_ray.roles.rollout import RolloutWorker
    from dqd_ray.runtime.evaluator import PooledEvaluator
    from dqd_ray.runtime.placement import OnRay

    env = "QDHopperBulletEnv-v0"
    meta = env_metadata(env)
    spec = PolicySpec(meta.obs_dim, meta.act_dim, (16, 16))
    rng = np.random.default_rng(0)
    genomes = np.stack([spec.init_genome(rng) for _ in range(48)])  # random: hoppers fall
    seeds = np.arange(48) + 7

    def evaluator(adaptive: bool):
        p = OnRay(call_timeout_s=120)
        replay = ray.remote(num_cpus=0)(ReplayBuffer).remote(
            meta.obs_dim, meta.act_dim, 1 + meta.measure_dim, 50_000, seed=0)
        workers = [ray.remote(num_cpus=0)(RolloutWorker).remote(
            env, spec, num_envs=2, episode_length=200, sink=ReplaySink(replay))
            for _ in range(2)]
        ev = PooledEvaluator(p, workers, replay, chunk=4, keyed=True)
        if not adaptive:
            ev.min_call_steps = 0
        return ev, replay, workers

    runs = {}
    for adaptive in (False, True):
        ev, replay, workers = evaluator(adaptive)
        assert ev.chunk_size(48) == 4  # nothing measured yet
        first = ev.evaluate(genomes, seeds)
        assert ev.mean_length == first["env_steps"] / 48 < 100
        size = ev.chunk_size(48)
        assert size == (12 if adaptive else 4)  # 48 genomes, 2 workers: 2 calls each
        second = ev.evaluate(genomes, seeds + 1000)
        data = ray.get(replay.state_dict.remote())["data"]
        runs[adaptive] = (first, second, data, size)
        for h in (replay, *workers):
            ray.kill(h)
    (f0, s0, d0, _), (f1, s1, d1, _) = runs[False], runs[True]
    for a, b in ((f0, f1), (s0, s1)):
        for key in ("fitness", "measures", "length", "valid"):
            np.testing.assert_array_equal(a[key], b[key])
    for key in d0:
        np.testing.assert_array_equal(d0[key], d1[key])
    assert len(d0["obs"]) == f0["env_steps"] + s0["env_steps"]


def test_config_error_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dqd_ray.cli", "run", "--out", str(tmp_path / "x"),
         "--set", "td3.bach_size=3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "td3.bach_size" in proc.stderr and "unknown key" in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    assert not (tmp_path / "x").exists()


def test_gpu_fallback_and_strict(ray_session, capsys):
    from dqd_ray.runtime import GPUUnavailableError, resolve_resources

    n, gpus = resolve_resources(_tiny_cfg("resources.num_gpus_per_learner=1"))
    assert gpus == 0.0 and n == 2
    assert "using CPU learners instead" in capsys.readouterr().out
    with pytest.raises(GPUUnavailableError, match="strict_gpu"):
        resolve_resources(_tiny_cfg("resources.num_gpus_per_learner=1",
                                    "resources.strict_gpu=true"))


def test_a_sync_learner_shares_the_rollout_cores_of_a_machine(ray_session):
    """Every CPU steps robots: on a Ray this process started, a sync CPU learner
    (it trains only inside each iteration) asks for no CPU and the default graph
    has a rollout worker per CPU; an async one, or one told not to share,
    reserves its core; a Tune trial's bundles reserve it unless told to share."""
    import ray

    from dqd_ray.runtime.resources import learner_cpus, resolve_resources, trial_bundles

    cpus = int(ray.cluster_resources()["CPU"])
    sync = build_config("cma_mega_td3", sets=["resources.learner_mode=sync"])
    assert resolve_resources(sync) == (cpus, 0.0) and learner_cpus(sync, 0.0) == 0.0
    for extra in ("resources.share_learner_cpus=false", "resources.learner_mode=async"):
        cfg = build_config("cma_mega_td3", sets=["resources.learner_mode=sync", extra])
        assert resolve_resources(cfg) == (cpus - 1, 0.0) and learner_cpus(cfg, 0.0) == 1.0
    two = ["resources.learner_mode=sync", "resources.num_rollout_workers=2"]
    assert trial_bundles(build_config("cma_mega_td3", sets=two), 1) == [{"CPU": 1.0}] * 4
    shared = build_config("cma_mega_td3", sets=[*two, "resources.share_learner_cpus=true"])
    assert trial_bundles(shared, 1) == [{"CPU": 1.0}] * 3  # no bundle for the learner


def test_resume_refuses_conflicts_and_skips_broken_checkpoints(tmp_path):
    """Backend-independent checks of resume, in process for speed."""
    out = tmp_path / "run"
    assert main(["run", "--preset", "cma_mega_td3", "--out", str(out), "--local-inprocess",
                 *sets("iterations=4", "resources.learner_mode=sync")]) == 0
    with pytest.raises(ConfigError, match=r"td3.gamma: run has 0.99, requested 0.5"):
        Experiment.resume(out, ["td3.gamma=0.5"])
    assert main(["resume", str(out), "--set", "env.episode_length=20"]) == 2
    # Corrupt the newest checkpoint: the previous one is used, with a warning.
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    blob = (newest / "coordinator.npz").read_bytes()
    (newest / "coordinator.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.warns(UserWarning, match="corrupted"):
        path, manifest = ckpt.latest_valid(out / "checkpoints")
    assert manifest["iteration"] == 2
    # A half-written one (no manifest) is never picked either.
    (out / "checkpoints" / "ckpt_0000009").mkdir()
    with pytest.warns(UserWarning):
        assert ckpt.latest_valid(out / "checkpoints")[1]["iteration"] == 2
    (out / "checkpoints" / "ckpt_0000009").rmdir()
    with pytest.warns(UserWarning):
        Experiment.resume(out, ["iterations=5"], backend="inprocess").run()
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4, 5]  # 3, 4 rewritten once
    # A checkpoint from another format version is refused by name.
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["format_version"] = 99
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        Experiment.resume(out, ["iterations=6"])


def test_wandb_offline_run(tmp_path, monkeypatch):
    """The wandb sink does not depend on the placement: in process for speed
    (the Tune tests log from trials on Ray)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    assert main(["run", "--preset", "cma_mega_td3", "--out", str(out), "--local-inprocess",
                 *sets("iterations=2", "logging.wandb=true", "logging.heatmap_every=1",
                       "logging.final_gif=true")]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the offline log `wandb sync` uploads
    files = {p.name for p in Path(runs[0], "files").rglob("*")}
    assert any(name.endswith(".png") for name in files)  # the archive heatmap
    # The end of the run: the final heatmap and the best elite's GIF.
    assert any(n.startswith("final_archive") and n.endswith(".png") for n in files), files
    assert any(n.startswith("best_elite") and n.endswith(".gif") for n in files), files
    assert (out / "archive.png").exists() and (out / "best_elite.gif").exists()


def test_several_learners_compute_what_one_learner_computes(ray_session):
    """Splitting the critics between learners is placement only: in sync mode
    every jacobian row, loss and archive equals the single learner's."""
    from dqd_ray.roles.policy import PolicySpec
    from dqd_ray.runtime import LearnerGroup, System

    spec = None
    results = {}
    for n in (1, 3):
        cfg = _tiny_cfg(f"resources.num_learners={n}", "resources.num_rollout_workers=1")
        spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
        # One learner in process (the same numbers as on Ray), three on Ray.
        system = System(cfg, "ray" if n == 3 else "inprocess", torch_threads=1)
        try:
            metrics = [system.iteration() for _ in range(2)]
            if n == 3:
                # The coordinator holds learner handles and, since iteration 1,
                # their sealed snapshots, yet its process never loads torch
                # (dqd_ray._pyribs; Learner.sealed_snapshot).
                import ray

                snap, torch_loaded = ray.get(system.coordinator.__ray_call__.remote(
                    lambda c: (c.learner.snapshot_iteration, "torch" in sys.modules)),
                    timeout=60)
                assert snap == 1 and torch_loaded is False
            group = LearnerGroup(system.p, system.learners, system.splits)
            genomes = np.stack([spec.init_genome(np.random.default_rng(i)) for i in range(3)])
            results[n] = {"split": system.splits, "metrics": metrics,
                          "jac": group.jacobian(genomes), "greedy": group.greedy_genome(),
                          "archive": system.archive()}
        finally:
            system.close()
    one, three = results[1], results[3]
    assert one["split"] == [[0, 1, 2, 3, 4]] and three["split"] == [[0, 1], [2, 3], [4]]
    assert three["jac"].shape == (3, 5, spec.genome_dim) and np.isfinite(three["jac"]).all()
    assert (np.linalg.norm(three["jac"], axis=2) > 0).all()
    for row in range(5):
        np.testing.assert_allclose(three["jac"][:, row], one["jac"][:, row], rtol=1e-4,
                                   atol=1e-6, err_msg=f"jacobian row {row}")
    np.testing.assert_allclose(three["greedy"], one["greedy"], atol=1e-6)
    assert "critic_loss_per_objective" in three["metrics"][-1]
    for a, b in zip(one["metrics"], three["metrics"]):
        la, lb = a.get("critic_loss_per_objective"), b.get("critic_loss_per_objective")
        assert (la is None and lb is None) or la == pytest.approx(lb, rel=1e-5)
        assert a["qd_score"] == pytest.approx(b["qd_score"])
    assert sorted(one["archive"]["index"]) == sorted(three["archive"]["index"])


def test_async_learners_train_on_ray(ray_session, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--preset", "cma_mega_td3", "--out", str(out),
                 *sets("iterations=5", "checkpoint.every=2", "env.episode_length=100",
                       "resources.learner_mode=async", "resources.num_learners=2",
                       "td3.async_replay_ratio=8")]) == 0
    metrics = read_metrics(out)
    updates = [m["critic_updates_total"] for m in metrics]
    assert updates[-1] > updates[1] > 0, updates
    assert all(b >= a for a, b in zip(updates, updates[1:]))
    assert all(np.isfinite(metrics[-1]["critic_loss_per_objective"]))
    states = [ckpt.load_checkpoint(p, ckpt.verify(p)) for p in
              ckpt.list_checkpoints(out / "checkpoints")[:2]]  # iterations 2 and 4
    added = [s["replay"]["total_added"] for s in states]
    for i in range(2):  # each learner
        a, b = states[0]["learners"][i], states[1]["learners"][i]
        assert b["updates"] > a["updates"] > 0
        # The cap (checked per 50-batch chunk) held at both checkpoints.
        for st, n in ((a, added[0]), (b, added[1])):
            assert st["updates"] * 32 <= 8 * n + 50 * 32, (st["updates"], n)
        assert all(not torch.equal(a["critic"][k], b["critic"][k]) for k in a["critic"])


class SignalLater:
    """A metric sink that sends ``sig`` to this process ``delay`` seconds after
    iteration ``after`` is logged, so it lands inside a later iteration."""

    def __init__(self, after: int, delay: float, sig):
        self.after, self.delay, self.sig = after, delay, sig

    def wants_archive(self, iteration):
        return False

    def log(self, metrics, archive=None, checkpoint=None):
        if metrics["iteration"] == self.after:
            threading.Timer(self.delay, os.kill, (os.getpid(), self.sig)).start()

    def close(self):
        pass


@pytest.fixture(scope="module")
def in_process_reference(tmp_path_factory):
    """The uninterrupted sync run, in process (the placements agree exactly)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    Experiment.create(_tiny_cfg("iterations=8", "checkpoint.every=100"), out,
                      backend="inprocess").run()
    return out


# SIGTERM only: both signals take the same handler, and both are tested in
# process (test_loop.py) and SIGINT through the CLI (test_loop.py).
@pytest.mark.parametrize("sig, delay", [(signal.SIGTERM, 0.2)], ids=["SIGTERM"])
def test_stop_signal_on_ray_checkpoints_the_running_iteration(
        ray_session, tmp_path, in_process_reference, capsys, sig, delay):
    out = tmp_path / "run"
    exp = Experiment.create(_tiny_cfg("iterations=1000", "checkpoint.every=100"), out)
    summary = exp.run(sinks=[SignalLater(2, delay, sig)])
    assert summary["interrupted"] is True
    stopped_at = summary["final"]["iteration"]
    assert 2 <= stopped_at < 8
    assert [m["iteration"] for m in read_metrics(out)] == list(range(1, stopped_at + 1))
    assert ckpt.latest_valid(out / "checkpoints")[1]["iteration"] == stopped_at
    assert f"checkpointed iteration {stopped_at}" in capsys.readouterr().out
    Experiment.resume(out, ["iterations=8"]).run()
    got, ref = read_metrics(out), read_metrics(in_process_reference)
    assert [m["iteration"] for m in got] == list(range(1, 9))
    for a, b in zip(got, ref):
        for key in ("qd_score", "num_elites", "env_steps", "evaluations", "best_fitness"):
            assert a[key] == b[key], (a["iteration"], key)
        assert a.get("critic_loss") == pytest.approx(b.get("critic_loss"))
