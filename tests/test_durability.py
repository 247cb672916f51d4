"""Nothing lost on a crash, and the end of a run reaches wandb.

- iteration N's metrics line is on disk (fsynced) before checkpoint N;
- checkpoints are written in the background, one at a time, complete before
  ``run()`` returns or a sink is given one, and a failed write is raised
  naming the checkpoint;
- a torn last line of ``metrics.jsonl`` (a crash while it was written) is
  dropped with a warning by ``resume``, ``show`` and ``bench quality``; any
  other corrupt line is an error naming the file and the line;
- the files the loop rewrites (``metrics.jsonl`` after a resume from an older
  checkpoint, ``config.yaml``, ``summary.json``) are replaced atomically;
- a run directory takes one process at a time (``RUN_DIR/.lock``), and a lock
  left by a dead process is taken over with a warning;
- the final heatmap and GIF are logged at a step wandb accepts, in a fresh run
  and after a resume (read back from the offline run's ``.wandb`` file).

Tiny in-process MAP-Elites runs (real physics, a few seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from wandb_records import wandb_history

from dqd_ray.bench.quality import curves_of
from dqd_ray.cli import main
from dqd_ray.config import ConfigError, build_config
from dqd_ray.logging import JsonlSink
from dqd_ray.loop import Experiment, RunFailed, read_metrics
from dqd_ray.state import checkpoint as ckpt
from dqd_ray.state.rundir import (
    MetricsFileError,
    RunDirInUse,
    RunLock,
    atomic_write_text,
    read_jsonl,
)
from dqd_ray.state.writer import CheckpointWriter, checkpoint_bytes

TINY = ["env.id=QDHalfCheetahBulletEnv-v0", "env.episode_length=30", "algorithm.batch_size=4",
        "metrics.robustness_every=0", "checkpoint.every=1", "logging.progress_bar=false",
        "logging.final_gif=false", "resources.envs_per_worker=2"]
TORN = '{"iteration": 4, "evaluations": 16, "qd_sc'  # a line cut by a crash


def tiny(*extra):
    return build_config("map_elites", sets=[*TINY, *extra])


def new_run(run_dir: Path, *extra) -> Path:
    Experiment.create(tiny(*extra), run_dir, backend="inprocess").run()
    return run_dir


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-iteration run (checkpoints 2 and 3 kept); tests copy it."""
    return new_run(tmp_path_factory.mktemp("finished") / "run", "iterations=3")


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def iterations(run_dir: Path) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file must read back clean
        return [m["iteration"] for m in read_metrics(run_dir)]


# -- iteration N's metrics line before checkpoint N -------------------------------------


def test_metrics_line_is_fsynced_before_its_checkpoint(tmp_path, monkeypatch):
    """A crash between the two can lose a checkpoint (the run resumes from the
    one before), never a metrics line: at every save (in the loop and the
    final one) the iteration's line is already in metrics.jsonl, flushed and
    fsynced. Sinks after the checkpoint (Tune's report) still get its path."""
    real_save, real_fsync = ckpt.save_checkpoint, os.fsync
    seen, synced, reported = [], [], []

    def save(root, iteration, *args, **kw):
        lines = (root.parent / "metrics.jsonl").read_text().splitlines()
        seen.append((iteration, json.loads(lines[-1])["iteration"], len(synced)))
        return real_save(root, iteration, *args, **kw)

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists()
                      else fd)
        return real_fsync(fd)

    class Report:  # what TuneReportSink needs: the metrics and the checkpoint just saved
        def wants_archive(self, iteration):
            return False

        def log(self, metrics, archive=None, checkpoint=None):
            reported.append((metrics["iteration"], checkpoint and Path(checkpoint).name))
            assert checkpoint is None or (Path(checkpoint) / "manifest.json").exists()

        def close(self):
            pass

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    Experiment.create(tiny("iterations=3", "checkpoint.every=2"), out,
                      backend="inprocess").run(sinks=[Report()])
    # Checkpoint 2 in the loop, 3 at the end (3 is not a multiple of every=2).
    assert [(it, line) for it, line, _ in seen] == [(2, 2), (3, 3)]
    metrics_syncs = [n for n, path in enumerate(synced) if str(path).endswith("metrics.jsonl")]
    for it, _, n_synced in seen:  # every line up to the iteration fsynced before its save
        assert sum(1 for n in metrics_syncs if n < n_synced) == it
    assert reported == [(1, None), (2, "ckpt_0000002"), (3, None)]
    assert iterations(out) == [1, 2, 3]


# -- checkpoints written in the background, one at a time -------------------------------


def test_checkpoints_are_written_while_the_next_iteration_runs_and_before_run_returns(
        tmp_path, monkeypatch):
    """Checkpoint 2 is written in another thread while iteration 3 runs (its
    write waits until iteration 3's metrics line exists), the final one (3) is
    complete when run() returns, and each is recorded with its cost."""
    real_save = ckpt.save_checkpoint
    third, writes = threading.Event(), []

    def save(root, iteration, *args, **kw):
        overlapped = third.wait(60) if iteration == 2 else None
        writes.append((iteration, threading.current_thread() is threading.main_thread(),
                       overlapped))
        return real_save(root, iteration, *args, **kw)

    class Third:
        uses_checkpoint = False

        def wants_archive(self, iteration):
            return False

        def log(self, metrics, archive=None, checkpoint=None):
            if metrics["iteration"] == 3:
                third.set()

        def close(self):
            pass

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    out = tmp_path / "run"
    exp = Experiment.create(tiny("iterations=3", "checkpoint.every=2"), out,
                            backend="inprocess")
    exp.run(sinks=[Third()])
    assert writes == [(2, False, True), (3, False, None)]  # in the background, overlapped
    writer = exp.checkpoint_writer
    assert not writer.in_flight
    assert [r["iteration"] for r in writer.records] == [2, 3]
    for r in writer.records:
        assert r["capture_s"] > 0 and r["write_s"] > 0
        assert r["bytes"] == checkpoint_bytes(r["path"]) > 0
        assert r["bytes"] == sum(p.stat().st_size for p in r["path"].iterdir())
    path, manifest = ckpt.latest_valid(out / "checkpoints")
    assert path == writer.records[-1]["path"] and manifest["iteration"] == 3
    assert ckpt.load_checkpoint(path, manifest)["archive"]["index"].size
    assert not list((out / "checkpoints").glob(".tmp_ckpt_*"))
    lines = read_metrics(out)
    assert [m["checkpoint_capture_s"] > 0 for m in lines] == [False, True, False]
    # The newest write that ended: none by iteration 3's line (2 was still waiting).
    assert [m["checkpoint_write_s"] for m in lines] == [0.0, 0.0, 0.0]


def test_a_sink_given_a_checkpoint_gets_it_complete(tmp_path, monkeypatch):
    """Tune's report copies the directory it is given: the loop waits for a
    slow background write before calling a sink that takes the checkpoint."""
    real_save, given = ckpt.save_checkpoint, []

    def slow(root, iteration, *args, **kw):
        time.sleep(1.0)
        return real_save(root, iteration, *args, **kw)

    class Report:  # no uses_checkpoint: it may use the checkpoint
        def wants_archive(self, iteration):
            return False

        def log(self, metrics, archive=None, checkpoint=None):
            if checkpoint is not None:
                given.append(ckpt.verify(Path(checkpoint))["iteration"])

        def close(self):
            pass

    monkeypatch.setattr(ckpt, "save_checkpoint", slow)
    Experiment.create(tiny("iterations=2"), tmp_path / "run",
                      backend="inprocess").run(sinks=[Report()])
    assert given == [1, 2]


def _writer(tmp_path, write, **kw) -> CheckpointWriter:
    return CheckpointWriter(tmp_path / "checkpoints", {}, keep=3, write=write, **kw)


def test_a_second_write_waits_for_the_first(tmp_path):
    events = []

    def slow(root, iteration, state, config, keep):
        events.append(("start", iteration))
        time.sleep(0.5 if iteration == 1 else 0.0)
        path = root / f"ckpt_{iteration:07d}"
        path.mkdir(parents=True)
        (path / "data").write_bytes(bytes(state["n"]))
        events.append(("end", iteration))
        return path

    writer = _writer(tmp_path, slow)
    writer.submit(1, {"n": 10}, capture_s=0.25)
    assert writer.in_flight and ("end", 1) not in events
    writer.submit(2, {"n": 20})
    assert events[:3] == [("start", 1), ("end", 1), ("start", 2)]  # never two at once
    writer.close()
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert [(r["iteration"], r["capture_s"], r["bytes"]) for r in writer.records] == [
        (1, 0.25, 10), (2, 0.0, 20)]
    assert writer.records[0]["write_s"] >= 0.5 and writer.last_write_s == \
        writer.records[1]["write_s"]
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(3, {"n": 1})


def test_a_failed_background_write_is_raised_at_the_next_submit_and_at_close(tmp_path):
    def failing(root, iteration, state, config, keep):
        if iteration in state["fail"]:
            raise OSError(28, "No space left on device")
        path = root / f"ckpt_{iteration:07d}"
        path.mkdir(parents=True)
        return path

    writer = _writer(tmp_path, failing, previous=4)
    writer.submit(5, {"fail": {6}})
    writer.submit(6, {"fail": {6}})
    with pytest.raises(ckpt.CheckpointError) as info:
        writer.submit(7, {"fail": {6}})
    msg = str(info.value)
    assert str(tmp_path / "checkpoints" / "ckpt_0000006") in msg
    assert "No space left on device" in msg and "iteration 5 stays the resume point" in msg
    assert isinstance(info.value.__cause__, OSError)
    writer.submit(8, {"fail": {8}})  # the writer goes on after a raised failure
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_0000008: writing this checkpoint "
                                                   r"failed \(OSError"):
        writer.close()
    assert [r["iteration"] for r in writer.records] == [5]  # 7 was not submitted


def test_a_write_that_takes_too_long_is_given_up_with_a_message(tmp_path):
    release = threading.Event()

    def stuck(root, iteration, state, config, keep):
        release.wait(30)
        raise OSError("released")

    writer = _writer(tmp_path, stuck, timeout_s=0.2, previous=3)
    writer.submit(4, {})
    t0 = time.perf_counter()
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_0000004: writing this checkpoint "
                       r"took over 0.2 s; given up .*iteration 3 stays the resume point"):
        writer.close()
    assert time.perf_counter() - t0 < 5
    assert not writer.in_flight
    release.set()


@pytest.mark.parametrize("iterations", [1, 2])
def test_a_failed_checkpoint_write_stops_the_run_naming_the_checkpoint(tmp_path, monkeypatch,
                                                                      iterations):
    """Checkpoint 1's write fails: with a second iteration the run stops when
    it would write checkpoint 2; alone, run() raises it when it waits for the
    last write. Either way the message names the checkpoint and the error."""
    def failing(root, iteration, *args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", failing)
    out = tmp_path / "run"
    exp = Experiment.create(tiny(f"iterations={iterations}"), out, backend="inprocess")
    expected = RunFailed if iterations == 2 else ckpt.CheckpointError
    with pytest.raises(expected) as info:
        exp.run()
    msg = str(info.value)
    assert f"{out / 'checkpoints' / 'ckpt_0000001'}: writing this checkpoint failed" in msg
    assert "No space left on device" in msg and "no checkpoint" in msg
    assert [m["iteration"] for m in read_metrics(out)] == [1]  # 2 stopped before its line
    assert not ckpt.list_checkpoints(out / "checkpoints")
    assert not (out / RunLock.NAME).exists()  # the run let go of its directory


def test_jsonl_sink_fsyncs_every_line(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    try:
        for i in (1, 2):
            sink.log({"iteration": i, "qd_score": float("nan")})
            assert calls[-1] == sink.f.fileno()
            assert (tmp_path / "metrics.jsonl").read_text().count("\n") == i  # flushed
    finally:
        sink.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[0] == {"iteration": 1, "qd_score": None}


# -- a torn last line ------------------------------------------------------------------


def test_reader_drops_a_torn_last_line_and_names_any_other_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2}\n\n' + TORN)
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped its torn last line"):
        assert read_jsonl(path) == [{"iteration": 1}, {"iteration": 2}]
    path.write_text('{"iteration": 1}\n{"iteration": 2}\n\0\0\0\0\n')  # a zero-filled tail
    with pytest.warns(UserWarning, match="torn last line"):
        assert len(read_jsonl(path)) == 2
    path.write_text('{"iteration": 1}\n' + TORN + '\n{"iteration": 3}\n')
    with pytest.raises(MetricsFileError, match=rf"{path}, line 2: not a JSON object"):
        read_jsonl(path)
    path.write_text('{"iteration": 1}\n[1, 2]\n{"iteration": 3}\n')
    with pytest.raises(ConfigError, match="line 2: not a JSON object \\(a JSON list\\)"):
        read_jsonl(path)
    path.write_text('{"iteration": 1}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_jsonl(path) == [{"iteration": 1}]


@pytest.mark.parametrize("tail", [TORN, TORN + "\n", '{"iteration": 4}'],
                         ids=["cut", "cut-newline", "whole-no-newline"])
def test_resume_drops_a_torn_last_line_and_appends_whole_lines(run_dir, tail):
    """The crash hit the metrics line of iteration 4 (so before checkpoint 4):
    the run resumes from checkpoint 3, drops the torn line (warning) and
    writes iteration 4 again on a line of its own."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(tail)
    exp = Experiment.resume(run_dir, ["iterations=4"], backend="inprocess")
    if tail.startswith(TORN):
        with pytest.warns(UserWarning, match="dropped its torn last line"):
            exp.run()
    else:  # a whole line past checkpoint 3: an abandoned continuation
        exp.run()
        assert (run_dir / "metrics.abandoned.jsonl").read_text() == tail + "\n"
    assert iterations(run_dir) == [1, 2, 3, 4]


def test_resume_refuses_a_corrupt_line_before_the_last_before_starting(run_dir, capsys):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["resume", str(run_dir), "--local-inprocess", "--set", "iterations=4"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'metrics.jsonl'}, line 2: not a JSON object" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing ran
    assert not (run_dir / RunLock.NAME).exists()


def test_show_and_bench_quality_drop_a_torn_last_line(run_dir, tmp_path, capsys):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(TORN)
    with pytest.warns(UserWarning, match="dropped its torn last line"):
        assert main(["show", str(run_dir), "--out", str(tmp_path / "show")]) == 0
    rows = json.loads((tmp_path / "show" / "summary.json").read_text())
    assert rows[0]["iteration"] == 3  # the last whole line
    with pytest.warns(UserWarning, match="dropped its torn last line"):
        (curve,) = curves_of([{"run_dir": str(run_dir), "preset": "map_elites", "seed": 0}])
    assert [m["iteration"] for m in curve["metrics"]] == [1, 2, 3]
    # A bad line that is not the last stays an error, with its file and line.
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]))
    capsys.readouterr()
    assert main(["show", str(run_dir), "--out", str(tmp_path / "show2")]) == 2
    assert "metrics.jsonl, line 2: not a JSON object" in capsys.readouterr().err
    with pytest.raises(MetricsFileError, match="line 2"):
        curves_of([{"run_dir": str(run_dir), "preset": "map_elites", "seed": 0}])


# -- atomic rewrites -------------------------------------------------------------------


def _fail_replace(monkeypatch):
    def replace(src, dst):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(os, "replace", replace)


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")
    with monkeypatch.context() as m:
        _fail_replace(m)
        with pytest.raises(OSError, match="simulated"):
            atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_metrics_rewrite_after_a_fallback_resume_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"iteration": i}) + "\n" for i in (1, 2, 3, 4)) + TORN
    path.write_text(text)
    fake = SimpleNamespace(run_dir=tmp_path)
    with monkeypatch.context() as m:
        _fail_replace(m)
        with pytest.warns(UserWarning, match="torn"), pytest.raises(OSError, match="simulated"):
            Experiment._truncate_metrics(fake, 2)
    assert path.read_text() == text  # untouched; the abandoned lines were saved first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.warns(UserWarning, match="torn"):
        Experiment._truncate_metrics(fake, 2)
    assert [m["iteration"] for m in read_jsonl(path)] == [1, 2]
    abandoned = read_jsonl(tmp_path / "metrics.abandoned.jsonl")
    assert [m["iteration"] for m in abandoned] == [3, 4, 3, 4]  # once per attempt, none lost


def test_config_rewrite_on_resume_is_atomic_and_a_failure_releases_the_lock(run_dir,
                                                                           monkeypatch):
    before = (run_dir / "config.yaml").read_text()
    with monkeypatch.context() as m:
        _fail_replace(m)
        with pytest.raises(OSError, match="simulated"):
            Experiment.resume(run_dir, ["iterations=5"], backend="inprocess")
    assert (run_dir / "config.yaml").read_text() == before
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert not (run_dir / RunLock.NAME).exists()
    exp = Experiment.resume(run_dir, ["iterations=5"], backend="inprocess")  # not locked out
    assert "iterations: 5" in (run_dir / "config.yaml").read_text()
    del exp


# -- one process per run directory ------------------------------------------------------


HOLD = """
import sys, time
from dqd_ray.state.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_or_resume_on_a_directory_in_use_is_refused(run_dir, tmp_path, capsys):
    exp = Experiment.resume(run_dir, ["iterations=4"], backend="inprocess")
    info = json.loads((run_dir / RunLock.NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    me = f"pid {os.getpid()} on host {socket.gethostname()}"
    with pytest.raises(RunDirInUse, match=f"is in use by {me}"):
        Experiment.resume(run_dir, ["iterations=4"], backend="inprocess")
    assert main(["resume", str(run_dir), "--local-inprocess"]) == 2
    assert f"{run_dir} is in use by {me}" in capsys.readouterr().err
    with pytest.raises(RunDirInUse, match=me):  # a Tune restore into it
        Experiment.restore(tiny("iterations=4"), run_dir, ckpt.list_checkpoints(
            run_dir / "checkpoints")[-1], backend="inprocess")
    exp.run()  # the holder itself runs on, and releases the lock at the end
    assert not (run_dir / RunLock.NAME).exists()
    assert iterations(run_dir) == [1, 2, 3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # released cleanly: no stale-lock warning
        Experiment.resume(run_dir, ["iterations=4"], backend="inprocess").run()
    assert not (run_dir / RunLock.NAME).exists()
    # A fresh directory: a second `run --out` into it while the first runs.
    fresh = tmp_path / "fresh"
    first = Experiment.create(tiny("iterations=1"), fresh, backend="inprocess")
    with pytest.raises(RunDirInUse, match=me):
        Experiment.create(tiny("iterations=1"), fresh, backend="inprocess")
    first.run()
    with pytest.raises(ConfigError, match="already holds a run"):
        Experiment.create(tiny("iterations=1"), fresh, backend="inprocess")


def test_another_process_holding_the_lock_and_its_crash(run_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=f"in use by pid {holder.pid} on host "
                           f"{socket.gethostname()}"):
            Experiment.resume(run_dir, ["iterations=4"], backend="inprocess")
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays
        holder.wait()
    assert json.loads((run_dir / RunLock.NAME).read_text())["pid"] == holder.pid
    with pytest.warns(UserWarning, match=f"taking over the lock left by pid {holder.pid}"):
        exp = Experiment.resume(run_dir, ["iterations=4"], backend="inprocess")
    assert json.loads((run_dir / RunLock.NAME).read_text())["pid"] == os.getpid()
    exp.run()
    assert iterations(run_dir) == [1, 2, 3, 4] and not (run_dir / RunLock.NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(run_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / RunLock.NAME).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": "2020-01-01T00:00:00",
         "command": "dqd-ray run"}))
    with pytest.warns(UserWarning, match=f"taking over the lock left by pid {dead.pid} on host "
                      f"{socket.gethostname()} \\(since 2020-01-01T00:00:00"):
        exp = Experiment.resume(run_dir, ["iterations=3"], backend="inprocess")
    exp.run()
    assert not (run_dir / RunLock.NAME).exists()


def test_an_experiment_dropped_unrun_or_refused_releases_the_lock(run_dir):
    exp = Experiment.resume(run_dir, ["iterations=4"], backend="inprocess")
    assert (run_dir / RunLock.NAME).exists()
    del exp  # never run (a test, a caller that changed its mind)
    assert not (run_dir / RunLock.NAME).exists()
    with pytest.raises(ConfigError, match="resume cannot change"):
        Experiment.resume(run_dir, ["seed=5"], backend="inprocess")
    assert not (run_dir / RunLock.NAME).exists()
    lock = RunLock(run_dir).acquire()
    assert lock.acquire() is lock and lock.held  # re-entrant for its holder
    lock.release()
    lock.release()
    assert not lock.held and not (run_dir / RunLock.NAME).exists()


def test_a_tune_style_restore_in_the_same_process_after_a_run(run_dir, tmp_path):
    """A Tune trial restores (retry, PBT exploit) in the same worker process
    after its previous run of the directory ended: the lock was released."""
    saved = tmp_path / "tune_ckpt"
    shutil.copytree(ckpt.list_checkpoints(run_dir / "checkpoints")[-2], saved)
    Experiment.restore(tiny("iterations=4"), run_dir, saved, backend="inprocess").run()
    Experiment.restore(tiny("iterations=4"), run_dir, saved, backend="inprocess").run()
    assert iterations(run_dir) == [1, 2, 3, 4]
    assert len((run_dir / "restores.jsonl").read_text().splitlines()) == 2


# -- the end of a run reaches wandb ------------------------------------------------------




def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_final_heatmap_and_gif_reach_wandb_fresh_and_after_resume(tmp_path, monkeypatch,
                                                                  capfd):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    wandb_sets = ["logging.wandb=true", "logging.heatmap_every=1", "logging.final_gif=true",
                  "logging.gif_steps=8"]
    Experiment.create(tiny("iterations=2", *wandb_sets), out, backend="inprocess").run()
    first = capfd.readouterr()
    Experiment.resume(out, ["iterations=3"], backend="inprocess").run()
    second = capfd.readouterr()
    runs = _offline_runs(out)
    assert len(runs) == 2  # the resume continues the same wandb run id in a new offline log
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    for run, last, printed in zip(runs, (2, 3), (first, second)):
        assert "less than the current step" not in printed.out + printed.err
        (log,) = run.glob("*.wandb")
        rows = wandb_history(log)
        media = [r for r in rows if "final_archive/_type" in r]  # (nested keys joined by /)
        assert len(media) == 1, rows
        assert media[0]["final_archive/_type"] == "image-file"
        assert media[0]["best_elite/_type"] == "video-file"
        assert media[0]["best_elite/path"].endswith(".gif")
        assert (run / "files" / media[0]["final_archive/path"]).exists()
        steps = [r["_step"] for r in rows]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)
        # Right after the last iteration's step, the first one wandb accepts.
        assert max(r["_step"] for r in rows if "qd_score" in r) == last
        assert media[0]["_step"] == last + 1
