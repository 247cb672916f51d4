"""The driver loop in process: budgets, checkpoint rotation, what reaches the
archive, async learning, and stopping on SIGINT/SIGTERM so that the run
resumes exactly where an uninterrupted one would be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dqd_ray.config import build_config
from dqd_ray.loop import Experiment, read_metrics
from dqd_ray.roles.learner import Learner
from dqd_ray.roles.rollout import RolloutWorker
from dqd_ray.runtime import System
from dqd_ray.state import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# torch_threads=1: runs compared with each other (a `dqd-ray` subprocess against this
# process) do their torch reductions in one fixed order whatever the machine's core
# count (torch splits large reductions between its threads).
TINY = ["env.episode_length=40", "algorithm.batch_size=4", "td3.batch_size=32",
        "td3.critic_hidden_sizes=[32,32]", "td3.train_steps_per_iteration=5",
        "td3.jacobian_states=32", "td3.learning_starts=32", "td3.replay_capacity=20000",
        "resources.envs_per_worker=2", "resources.learner_mode=sync",
        "resources.torch_threads=1", "logging.progress_bar=false", "checkpoint.every=100"]
COMPARED = ("qd_score", "num_elites", "evaluations", "env_steps", "best_fitness",
            "critic_loss", "greedy_fitness", "restarts")
REFERENCE_ITERATIONS = 5


def tiny(*extra, preset="cma_mega_td3"):
    return build_config(preset, sets=[*TINY, *extra])


def run(tmp_path, name, *extra, **kw):
    exp = Experiment.create(tiny(*extra), tmp_path / name, backend="inprocess")
    return exp.run(**kw), tmp_path / name


def final_archive(run_dir) -> dict:
    path, manifest = ckpt.latest_valid(run_dir / "checkpoints")
    return ckpt.load_checkpoint(path, manifest)["archive"]


def assert_same_run(got_dir, ref_dir):
    """Same metrics per iteration and the same final archive."""
    got, ref = read_metrics(got_dir), read_metrics(ref_dir)
    assert [m["iteration"] for m in got] == [m["iteration"] for m in ref]
    for a, b in zip(got, ref):
        for key in COMPARED:
            va, vb = a.get(key), b.get(key)
            if va is None or vb is None:
                assert va is vb, (a["iteration"], key)
            else:
                assert va == pytest.approx(vb, rel=1e-9, abs=1e-12), (a["iteration"], key)
    a, b = final_archive(got_dir), final_archive(ref_dir)
    oa, ob = np.argsort(a["index"]), np.argsort(b["index"])
    for key in ("index", "objective", "measures", "solution"):
        np.testing.assert_array_equal(a[key][oa], b[key][ob])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted sync run of REFERENCE_ITERATIONS iterations."""
    summary, run_dir = run(tmp_path_factory.mktemp("reference"), "run",
                           f"iterations={REFERENCE_ITERATIONS}")
    assert summary["interrupted"] is False
    return run_dir


# -- budgets and checkpoints ---------------------------------------------------------


def test_checkpoint_rotation_keeps_the_newest_intact(tmp_path):
    _, out = run(tmp_path, "run", "iterations=7", "checkpoint.every=1", "checkpoint.keep=4")
    kept = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == [f"ckpt_{i:07d}" for i in (4, 5, 6, 7)]
    for path in kept:
        assert ckpt.verify(path)["iteration"] == int(path.name.split("_")[1])
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_evaluation_budget_stops_at_the_first_iteration_reaching_it(tmp_path):
    # 6 evaluations per iteration: theta, 4 branches, the greedy actor.
    summary, out = run(tmp_path, "run", "iterations=100", "evaluations=15")
    evals = [m["evaluations"] for m in read_metrics(out)]
    assert evals == [6, 12, 18]
    assert summary["final"]["iteration"] == 3
    assert ckpt.latest_valid(out / "checkpoints")[1]["iteration"] == 3
    Experiment.resume(out, ["evaluations=30"], backend="inprocess").run()
    assert [m["evaluations"] for m in read_metrics(out)] == [6, 12, 18, 24, 30]


# -- what reaches the archives ----------------------------------------------------------


class Recorder:
    """Wraps an in-process system's evaluator and keeps every result that may
    reach an archive (not the ES samples, evaluated with ``record=False``)."""

    def __init__(self, evaluator):
        self.inner, self.calls = evaluator, []

    def evaluate(self, genomes, seeds, record=True, **options):
        out = self.inner.evaluate(genomes, seeds, record=record, **options)
        if record:
            self.calls.append((np.array(genomes), {k: np.array(v) for k, v in out.items()}))
        return out


ANNEALED = {"cma_maega_td3": [], "cma_maega_td3_es": ["es.num_samples=4"],
            "sep_cma_mae": ["algorithm.num_emitters=2"], "lm_ma_mae": ["algorithm.num_emitters=2"],
            "openai_mae": ["algorithm.num_emitters=2"]}


@pytest.mark.parametrize("preset", ["cma_mega_td3", *ANNEALED])
def test_reported_archive_is_the_best_ever_per_cell_greedy_actor_included(preset):
    """The archive metrics and checkpoints report (CMA-MAE(GA): the result
    archive) holds, per cell, the best valid evaluation so far, whichever
    evaluation it came from: theta, branch or greedy TD3 actor; the annealed
    archive may drop an elite for a worse one, the result archive never does."""
    system = System(tiny(*ANNEALED.get(preset, []), preset=preset), "inprocess",
                    torch_threads=1)
    recorder = Recorder(system.coordinator.evaluator)
    system.coordinator.evaluator = recorder
    # TD3-ES evaluates theta with its ES samples in one call; the samples only
    # estimate gradients and reach no archive, so they are left out below.
    samples: set[bytes] = set()
    es_points = system.coordinator._es_points

    def spy(thetas, lead=0):
        points, eps = es_points(thetas, lead)
        samples.update(p.tobytes() for p in points[lead:])
        return points, eps

    system.coordinator._es_points = spy
    greedy: set[bytes] = set()  # the greedy actors' genomes, as the evaluator got them
    if system.coordinator.greedy:
        greedy_genome = system.coordinator.learner.greedy_genome

        def greedy_spy():
            g = greedy_genome()
            greedy.add(np.asarray(g, np.float32).tobytes())
            return g

        system.coordinator.learner.greedy_genome = greedy_spy
    try:
        history = [system.iteration() for _ in range(4)]
        result = system.coordinator.result_archive
        best: dict[int, tuple[float, np.ndarray, int]] = {}
        for call, (genomes, out) in enumerate(recorder.calls):
            cells = result.index_of(out["measures"])
            for i in np.flatnonzero(out["valid"]):
                if genomes[i].tobytes() in samples:
                    continue
                cell, f = int(cells[i]), float(out["fitness"][i])
                if cell not in best or f > best[cell][0]:
                    best[cell] = (f, genomes[i], (call, int(i)))
        data = system.archive()
        assert sorted(data["index"].tolist()) == sorted(best)
        for cell, f, sol in zip(data["index"], data["objective"], data["solution"]):
            assert f == pytest.approx(best[int(cell)][0], rel=1e-6)
            np.testing.assert_array_equal(sol, best[int(cell)][1].astype(sol.dtype))
        if system.coordinator.greedy:
            # The greedy actor is evaluated with theta and the branches: some of
            # its results must be the best of their cell, or this test proves
            # nothing about it.
            assert greedy and any(np.asarray(g, np.float32).tobytes() in greedy
                                  for _, g, _ in best.values())
        assert history[-1]["num_elites"] == len(best)
        if preset in ANNEALED:  # the annealed archive dropped some cell's best: kept here
            annealed = system.coordinator.archive.data()
            kept = dict(zip(data["index"].tolist(), data["objective"].tolist()))
            assert any(f < kept[int(c)] for c, f in zip(annealed["index"],
                                                        annealed["objective"]))
    finally:
        system.close()


def test_invalid_greedy_actor_is_counted_and_never_inserted():
    system = System(tiny("td3.train_steps_per_iteration=0"), "inprocess", torch_threads=1)
    recorder = Recorder(system.coordinator.evaluator)
    system.coordinator.evaluator = recorder
    try:
        system.iteration()
        learner = system.learners[0]
        state = learner.state_dict()
        for key in state["actor"]:
            state["actor"][key] = torch.full_like(state["actor"][key], float("nan"))
        learner.load_state_dict(state)
        before = system.archive()
        m = system.iteration()
        # One batch: theta (row 0), the greedy actor (row 1), the 4 branches.
        genomes, greedy_out = recorder.calls[-1]
        assert len(genomes) == 6 and np.isnan(genomes[1]).all()
        rest = np.r_[0, 2:6]
        assert np.isfinite(genomes[rest]).all() and greedy_out["valid"][rest].all()
        assert not greedy_out["valid"][1]
        assert m["invalid"] == 1
        assert not m.get("greedy_inserted_this_iteration", False)
        assert m["greedy_inserted"] == 1  # from the first iteration only
        after = system.archive()
        assert np.isfinite(after["solution"]).all() and np.isfinite(after["objective"]).all()
        assert len(after["index"]) >= len(before["index"])
    finally:
        system.close()


# -- async learner --------------------------------------------------------------------


def test_async_learner_trains_in_the_background_in_process(tmp_path):
    """The in-process placement honours learner_mode=async: a background
    thread keeps updating the critics between and during iterations."""
    _, out = run(tmp_path, "run", "resources.learner_mode=async", "iterations=6",
                 "checkpoint.every=3", "env.episode_length=100")
    metrics = read_metrics(out)
    updates = [m["critic_updates_total"] for m in metrics]
    assert updates[-1] > updates[2] > 0, updates
    assert all(b >= a for a, b in zip(updates, updates[1:]))
    assert all(m["time_train_s"] == 0 for m in metrics)  # nothing trained in the loop
    assert "critic_loss" in metrics[-1]
    states = [ckpt.load_checkpoint(p, ckpt.verify(p))["learners"][0]
              for p in ckpt.list_checkpoints(out / "checkpoints")]
    assert states[1]["updates"] > states[0]["updates"] > 0
    changed = [not torch.equal(states[0]["critic"][k], states[1]["critic"][k])
               for k in states[0]["critic"]]
    assert all(changed)


def test_learner_background_thread_over_a_plain_buffer():
    from dqd_ray.config import TD3Config
    from dqd_ray.roles.policy import PolicySpec
    from dqd_ray.roles.replay import ReplayBuffer

    rng = np.random.default_rng(0)
    replay = ReplayBuffer(3, 2, 2, 1000, seed=0)
    replay.add({"obs": rng.normal(size=(500, 3)).astype(np.float32),
                "action": rng.uniform(-1, 1, (500, 2)).astype(np.float32),
                "reward": rng.normal(size=(500, 2)).astype(np.float32),
                "next_obs": rng.normal(size=(500, 3)).astype(np.float32),
                "terminated": np.zeros(500, np.float32)})
    cfg = TD3Config(critic_hidden_sizes=[16], batch_size=16, learning_starts=10)
    learner = Learner(PolicySpec(3, 2, [8]), 2, cfg, replay, seed=0)
    learner.start_async(batches_per_pull=5)
    deadline = time.time() + 60
    while learner.stats()["updates"] < 30 and time.time() < deadline:
        time.sleep(0.05)
    learner.stop_async()
    assert learner.stats()["updates"] >= 30


def test_async_replay_ratio_caps_updates_until_new_experience_arrives():
    """``td3.async_replay_ratio``: with 500 transitions added and a ratio of 2,
    16-transition batches stop at 1000 / 16 = 62.5 updates, plus at most the
    chunk in flight (5 batches, the cap is checked per chunk); adding 500
    more lets the learner go on to 125 (+5)."""
    from dqd_ray.config import TD3Config
    from dqd_ray.roles.policy import PolicySpec
    from dqd_ray.roles.replay import ReplayBuffer

    rng = np.random.default_rng(0)
    replay = ReplayBuffer(3, 2, 2, 2000, seed=0)

    def add(n):
        replay.add({"obs": rng.normal(size=(n, 3)).astype(np.float32),
                    "action": rng.uniform(-1, 1, (n, 2)).astype(np.float32),
                    "reward": rng.normal(size=(n, 2)).astype(np.float32),
                    "next_obs": rng.normal(size=(n, 3)).astype(np.float32),
                    "terminated": np.zeros(n, np.float32)})

    def updates_when_idle(at_least):
        deadline = time.time() + 60
        while learner.stats()["updates"] < at_least and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # time for more updates, were the cap not binding
        return learner.stats()["updates"]

    add(500)
    cfg = TD3Config(critic_hidden_sizes=[16], batch_size=16, learning_starts=10,
                    async_replay_ratio=2.0)
    learner = Learner(PolicySpec(3, 2, [8]), 2, cfg, replay, seed=0)
    learner.start_async(batches_per_pull=5)
    try:
        first = updates_when_idle(63)
        assert 63 <= first <= 63 + 5, first
        assert updates_when_idle(first) == first  # waiting for data, not training
        add(500)
        second = updates_when_idle(125)
        assert 125 <= second <= 125 + 5, second
    finally:
        learner.stop_async()
    with pytest.raises(ValueError, match="async_replay_ratio"):
        TD3Config(async_replay_ratio=0)


# -- stopping and resuming -------------------------------------------------------------


def signal_on_call(monkeypatch, cls, method: str, call: int, sig=signal.SIGINT, times=1):
    """Sends ``sig`` to this process from inside the ``call``-th call of
    ``cls.method`` (1-based), as a user pressing Ctrl-C at that moment."""
    original = getattr(cls, method)
    count = {"n": 0}

    def wrapper(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            # Without the loop's own handler the signal would end pytest itself.
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler), \
                f"no {sig.name} handler is installed while the loop runs"
            for _ in range(times):
                os.kill(os.getpid(), sig)
                time.sleep(0.01)  # the handler runs here, inside the call
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)


# Per iteration of cma_mega_td3: stage critic updates, jacobian, greedy actor,
# critic updates and one evaluation: theta, the greedy actor and the branches.
STOP_POINTS = [
    (RolloutWorker, "evaluate", 2, signal.SIGINT, 2),  # iteration 2, its batch
    (RolloutWorker, "evaluate", 3, signal.SIGTERM, 3),  # iteration 3, its batch
    (Learner, "jacobian", 2, signal.SIGINT, 2),  # iteration 2, gradient step
    (Learner, "train_staged", 3, signal.SIGTERM, 3),  # iteration 3, critic updates
]


@pytest.mark.parametrize("cls, method, call, sig, stopped_at", STOP_POINTS,
                         ids=[f"{p[1]}{p[2]}-{p[3].name}" for p in STOP_POINTS])
def test_stop_signal_checkpoints_the_running_iteration_and_resumes_exactly(
        tmp_path, monkeypatch, reference, capsys, cls, method, call, sig, stopped_at):
    signal_on_call(monkeypatch, cls, method, call, sig)
    summary, out = run(tmp_path, "run", "iterations=1000")
    assert summary["interrupted"] is True
    assert summary["final"]["iteration"] == stopped_at
    assert [m["iteration"] for m in read_metrics(out)] == list(range(1, stopped_at + 1))
    path, manifest = ckpt.latest_valid(out / "checkpoints")
    assert manifest["iteration"] == stopped_at and path.name == f"ckpt_{stopped_at:07d}"
    printed = capsys.readouterr().out
    assert f"{sig.name}: stopping after the running iteration" in printed
    assert f"checkpointed iteration {stopped_at}" in printed
    assert signal.getsignal(sig) is not None and signal.getsignal(sig) != signal.SIG_IGN
    monkeypatch.undo()
    Experiment.resume(out, [f"iterations={REFERENCE_ITERATIONS}"], backend="inprocess").run()
    assert_same_run(out, reference)


def test_second_signal_stops_at_once_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch, reference, capsys):
    # Two Ctrl-C inside iteration 3's evaluation; checkpoints every 2.
    signal_on_call(monkeypatch, RolloutWorker, "evaluate", 3, times=2)
    summary, out = run(tmp_path, "run", "iterations=1000", "checkpoint.every=2")
    assert summary["interrupted"] is True and summary["final"]["iteration"] == 2
    assert "stopped at once; resume point: the checkpoint of iteration 2" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["ckpt_0000002"]
    monkeypatch.undo()
    Experiment.resume(out, [f"iterations={REFERENCE_ITERATIONS}"], backend="inprocess").run()
    assert_same_run(out, reference)


def test_resume_from_an_older_checkpoint_rewrites_the_metrics(tmp_path):
    _, out = run(tmp_path, "run", "iterations=5", "checkpoint.every=2")
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == "ckpt_0000005"
    (newest / "archive.npz").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="corrupted"):
        exp = Experiment.resume(out, ["iterations=6"], backend="inprocess")
    exp.run()
    assert [m["iteration"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    abandoned = (out / "metrics.abandoned.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in abandoned] == [5]


@pytest.mark.slow
# SIGINT (Ctrl-C) only: SIGTERM takes the same handler and is tested on Ray
# (test_ray_system.py) and in process (above).
@pytest.mark.parametrize("sig", [signal.SIGINT], ids=lambda s: s.name)
def test_cli_stop_signal_leaves_a_resumable_run(tmp_path, reference, sig):
    """`dqd-ray run` as a process: a signal mid-run, then `dqd-ray resume`."""
    out = tmp_path / "run"
    sets = []
    for s in [*TINY, "iterations=1000"]:
        sets += ["--set", s]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dqd_ray.cli", "run", "--local-inprocess", "--out", str(out),
         *sets], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, WANDB_MODE="offline"))
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                break
            time.sleep(0.02)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert f"{sig.name}: stopping after the running iteration" in output
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["final"]["iteration"]
    assert summary["interrupted"] is True and 1 <= stopped_at < REFERENCE_ITERATIONS, output
    assert ckpt.latest_valid(out / "checkpoints")[1]["iteration"] == stopped_at
    assert f"checkpointed iteration {stopped_at}" in output
    proc = subprocess.run(
        [sys.executable, "-m", "dqd_ray.cli", "resume", str(out), "--local-inprocess",
         "--set", f"iterations={REFERENCE_ITERATIONS}"], capture_output=True, text=True,
        timeout=300, env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_run(out, reference)


def _tiny_state(value: float) -> dict:
    return {"coordinator": {"tree": {"v": value}, "arrays": {"a": np.full(3, value)}},
            "archive": {"objective": np.full(2, value)}}


@pytest.mark.parametrize("crash_at", ["moved aside", "new one in place"])
def test_rewriting_a_checkpoint_never_leaves_none_readable(tmp_path, monkeypatch, crash_at):
    """keep=1 and the same iteration written twice (a stop right after a periodic
    checkpoint): a crash at either step of the swap leaves a readable checkpoint."""
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 4, _tiny_state(1.0), {}, keep=1)
    real = os.replace
    calls = []

    def crashing(src, dst):
        calls.append((str(src), str(dst)))
        if crash_at == "moved aside" and len(calls) == 2:  # old moved, new not yet
            raise KeyboardInterrupt
        real(src, dst)
        if crash_at == "new one in place" and len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", crashing)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 4, _tiny_state(2.0), {}, keep=1)
    monkeypatch.setattr(ckpt.os, "replace", real)
    path, manifest = ckpt.latest_valid(root)
    assert manifest["iteration"] == 4
    value = json.loads((path / "coordinator.json").read_text())["v"]
    assert value == (1.0 if crash_at == "moved aside" else 2.0)
    # The next write tidies up: one checkpoint per iteration, nothing aside.
    ckpt.save_checkpoint(root, 6, _tiny_state(3.0), {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["ckpt_0000004", "ckpt_0000006"]
    assert json.loads((root / "ckpt_0000004" / "coordinator.json").read_text())["v"] == value
