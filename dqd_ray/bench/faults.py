"""Fault injection on a real multi-node Ray cluster on this machine.

``dqd-ray bench faults`` starts a :class:`ray.cluster_utils.Cluster` (a head
and worker nodes, each a raylet with its own resources), runs ``dqd-ray run``
against it in a subprocess, injects faults and reports what survived:

- ``nodes``: one run; a rollout node, then the learner node, then the replay
  buffer's node are removed without a graceful shutdown
  (``remove_node(node, allow_graceful=False)``), each replaced by a new node.
  Reported: evaluations against the budget, per-iteration evaluation counts,
  elites over time and against every checkpoint, the learner's critic
  updates and loss around its restore, the replay size around its reload.
- ``driver``: the driver (``dqd-ray run``) is killed with SIGKILL after a
  checkpoint; ``dqd-ray resume`` continues from the newest checkpoint.
- ``wait``: runs that join the cluster and need a resource no node offers:
  one fails after ``resources.wait_for_resources_s`` with a message naming
  it; for the other a node offering it joins while it waits (what an
  autoscaler does), and it starts.
- ``checkpoint``: a run (in process) is killed with SIGKILL while it writes a
  checkpoint; the run directory keeps a readable checkpoint and ``dqd-ray
  resume`` finishes the run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dqd_ray.bench.common import machine_info, write_json

SCENARIOS = ("nodes", "driver", "wait", "checkpoint")

# Small enough for 2 cores and four raylets: one iteration takes a few seconds.
SMALL = [
    "env.episode_length=50", "algorithm.batch_size=4", "td3.batch_size=32",
    "td3.critic_hidden_sizes=[32,32]", "td3.jacobian_states=32", "td3.learning_starts=32",
    "td3.replay_capacity=20000", "resources.envs_per_worker=2", "resources.num_learners=1",
    "logging.progress_bar=false", "metrics.robustness_every=0",
]
# How the roles are placed on the test cluster (the same fields as on a real one).
PLACED = [
    "resources.num_rollout_workers=2", "resources.rollout_resource=rollout",
    "resources.learner_resource=learner", "resources.replay_resource=replay",
    "resources.pin_to_head=true", "resources.cpus_per_worker=1",
    "resources.cpus_per_learner=1", "resources.wait_for_resources_s=120",
]
# Node death is noticed after about a second instead of about half a minute.
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
               "health_check_timeout_ms": 500, "health_check_failure_threshold": 2}


class FaultError(RuntimeError):
    """A scenario could not be carried out (not: the system lost something)."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _lines(log: Path) -> list[str]:
    return _ANSI.sub("", log.read_text()).splitlines() if log.exists() else []


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def _last_iteration(run_dir: Path) -> int:
    m = _metrics(run_dir)
    return m[-1]["iteration"] if m else 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dqd_ray.cli", *args]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None,
          log: Path | None = None, on_poll=None) -> None:
    t0 = time.time()
    while not cond():
        if on_poll is not None:
            on_poll()
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise FaultError(f"the run exited (rc {proc.returncode}) while waiting for "
                             f"{what}:\n{tail}")
        if time.time() - t0 > timeout:
            raise FaultError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def _finish(proc: subprocess.Popen, timeout: float, log: Path) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise FaultError(f"the run did not finish in {timeout:g} s; log: {log}") from None
    if rc != 0:
        raise FaultError(f"the run failed (rc {rc}):\n{log.read_text()[-3000:]}")


def _cells(archive_npz: Path) -> dict[int, float]:
    with np.load(archive_npz, allow_pickle=False) as z:
        return {int(i): float(o) for i, o in zip(z["index"], z["objective"])}


def _elites_kept(run_dir: Path, checkpoints: list[Path]) -> dict[str, Any]:
    """Every elite of every checkpoint seen is in the final archive, at least as good."""
    from dqd_ray.state import checkpoint as ckpt

    final = ckpt.latest_valid(run_dir / "checkpoints")
    if final is None:
        raise FaultError(f"{run_dir}: no intact checkpoint at the end")
    last = _cells(final[0] / "archive.npz")
    lost = 0
    for cells in checkpoints:
        lost += sum(1 for i, o in _cells_of(cells).items() if last.get(i, -np.inf) < o - 1e-9)
    return {"final_elites": len(last), "checkpoints_compared": len(checkpoints),
            "elites_lost": lost}


def _lost_between(seen: dict[str, dict]) -> int:
    """Cells of each checkpoint missing (or worse) in the next one."""
    ordered = [seen[k] for k in sorted(seen)]
    return sum(1 for a, b in zip(ordered, ordered[1:])
               for i, o in a.items() if b.get(i, -np.inf) < o - 1e-9)


def _cells_of(saved: Any) -> dict[int, float]:
    return saved if isinstance(saved, dict) else _cells(saved)


def _copy_checkpoint_archives(run_dir: Path, seen: dict[str, dict]) -> None:
    """Remembers each checkpoint's archive (older ones are pruned later)."""
    from dqd_ray.state import checkpoint as ckpt

    for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        if path.name in seen:
            continue
        try:
            ckpt.verify(path)
            seen[path.name] = _cells(path / "archive.npz")
        except Exception:  # noqa: BLE001 - being written or pruned right now
            pass


# -- scenarios --------------------------------------------------------------------


def _scenario_nodes(cluster, work: Path, preset: str, iterations: int, extra: list[str],
                    timeout: float) -> dict[str, Any]:
    run_dir = work / "nodes"
    log = work / "nodes.log"
    rollout_b = [n for n in cluster.worker_nodes if n.dqd_role == "rollout_b"][0]
    learner_a = [n for n in cluster.worker_nodes if n.dqd_role == "learner_a"][0]
    replay_a = [n for n in cluster.worker_nodes if n.dqd_role == "replay_a"][0]
    at = {"rollout": 2, "learner": max(4, iterations // 3),
          "replay": max(6, 2 * iterations // 3)}
    args = _cli("run", "--preset", preset, "--address", cluster.address, "--out", str(run_dir),
                *_sets([*SMALL, *PLACED, f"iterations={iterations}", "checkpoint.every=2",
                        "checkpoint.learner_snapshot_every=2", *extra]))
    seen: dict[str, dict] = {}
    events: list[dict] = []
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            for role, node, replacement in (
                    ("rollout", rollout_b, {"num_cpus": 1, "resources": {"rollout": 1}}),
                    ("learner", learner_a, {"num_cpus": 1, "resources": {"learner": 1}}),
                    ("replay", replay_a, {"num_cpus": 0, "resources": {"replay": 1}})):
                # Checkpoints are written in the background and pruned: look at
                # each one while waiting, not only at the removals.
                _wait(lambda role=role: _last_iteration(run_dir) >= at[role], timeout,
                      f"iteration {at[role]} before removing the {role} node", proc, log,
                      on_poll=lambda: _copy_checkpoint_archives(run_dir, seen))
                _copy_checkpoint_archives(run_dir, seen)
                it = _last_iteration(run_dir)
                t0 = time.time()
                cluster.remove_node(node, allow_graceful=False)
                cluster.add_node(**replacement)
                events.append({"removed": f"{role} node", "after_iteration": it,
                               "replaced_in_s": round(time.time() - t0, 2)})
            while proc.poll() is None:
                _copy_checkpoint_archives(run_dir, seen)
                time.sleep(0.3)
            _finish(proc, timeout, log)
        finally:
            if proc.poll() is None:
                proc.kill()
    _copy_checkpoint_archives(run_dir, seen)
    m = _metrics(run_dir)
    its = [x["iteration"] for x in m]
    per_iter = [x["iteration_evaluations"] for x in m]
    from dqd_ray.config import build_config
    from dqd_ray.runtime import evaluations_per_iteration

    cfg = build_config(preset, sets=[*SMALL, *PLACED, f"iterations={iterations}", *extra])
    expected_per_iter = evaluations_per_iteration(cfg)
    learner_it = events[1]["after_iteration"]
    replay_it = events[2]["after_iteration"]
    before_l = next(x for x in reversed(m) if x["iteration"] <= learner_it)
    after_l = [x for x in m if x["iteration"] > learner_it and x.get("learner_restarts")]
    restore_line = next((ln for ln in _lines(log) if "learner 0 was restarted" in ln), None)
    before_r = next(x for x in reversed(m) if x["iteration"] <= replay_it)
    after_r = [x for x in m if x["iteration"] > replay_it and x.get("replay_restarts")]
    first = m[0]
    text = "\n".join(_lines(log))
    probe = re.search(r"probe critic loss (\S+) at the snapshot, (\S+) restored, (\S+) before",
                      restore_line or "")
    restored_it = re.search(r"restored the critics of iteration (\d+)", restore_line or "")
    out = {
        "events": events,
        # Ray's warning that a restartable actor's constructor arguments sit in
        # the object store (ray-project/ray#53727), and deprecation warnings.
        "restart_argument_warnings": text.count("has constructor arguments in the object store"),
        "deprecation_warnings": text.count("DeprecationWarning"),
        "worker_restarts": m[-1].get("worker_restarts"),
        "iterations": its,
        "iterations_unique": its == list(range(1, iterations + 1)),
        "evaluations": m[-1]["evaluations"],
        "evaluations_budget": iterations * expected_per_iter,
        "evaluations_per_iteration": sorted(set(per_iter)),
        "num_elites": [x["num_elites"] for x in m],
        "elites_never_decrease": all(a <= b for a, b in zip(
            [x["num_elites"] for x in m], [x["num_elites"] for x in m][1:])),
        **_elites_kept(run_dir, list(seen.values())),
        "learner_restarts": m[-1].get("learner_restarts"),
        "critic_updates_before_learner_loss": before_l.get("critic_updates_total"),
        "critic_updates_restored": (int(restore_line.split("(")[-1].split(" updates")[0])
                                    if restore_line and "updates)" in restore_line else None),
        "critic_updates_after_restore": (after_l[0].get("critic_updates_total")
                                         if after_l else None),
        "learner_restore_line": restore_line,
        "learner_restored_iteration": int(restored_it.group(1)) if restored_it else None,
        # The learner's critic loss on one fixed buffer batch: at the snapshot,
        # right after the restore, and of the restarted (fresh) learner before it.
        "probe_loss_snapshot": float(probe.group(1)) if probe else None,
        "probe_loss_restored": float(probe.group(2)) if probe else None,
        "probe_loss_fresh": float(probe.group(3)) if probe else None,
        "retried_task_lines": text.count("will be retried"),
        "elites_lost_between_checkpoints": _lost_between(seen),
        # Checkpoints skipped because a role restarted between their capture
        # and the gathering (the previous one stays the resume point).
        "checkpoints_skipped": sum(1 for ln in _lines(log)
                                   if "warning: ckpt_" in ln and "not written" in ln),
        "critic_loss_first_iteration": first.get("critic_loss"),
        "critic_loss_before_learner_loss": before_l.get("critic_loss"),
        "critic_loss_after_restore": next((x["critic_loss"] for x in after_l
                                           if x.get("critic_loss") is not None), None),
        "replay_restarts": m[-1].get("replay_restarts"),
        "replay_size_before_replay_loss": before_r.get("replay_size"),
        "replay_size_after_reload": after_r[0].get("replay_size") if after_r else None,
        "replay_reload_line": next((ln for ln in _lines(log)
                                    if "replay buffer restarted" in ln), None),
    }
    return out


def _scenario_driver(cluster, work: Path, preset: str, iterations: int, extra: list[str],
                     timeout: float) -> dict[str, Any]:
    from dqd_ray.state import checkpoint as ckpt

    run_dir = work / "driver"
    log = work / "driver.log"
    kill_after = max(3, iterations // 2)
    args = _cli("run", "--preset", preset, "--address", cluster.address, "--out", str(run_dir),
                *_sets([*SMALL, *PLACED, f"iterations={iterations}", "checkpoint.every=2",
                        *extra]))
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            _wait(lambda: (_last_iteration(run_dir) >= kill_after
                           and ckpt.latest_valid(run_dir / "checkpoints") is not None),
                  timeout, f"iteration {kill_after} and a checkpoint", proc, log)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = _last_iteration(run_dir)
    path, manifest = ckpt.latest_valid(run_dir / "checkpoints")
    saved = _cells(path / "archive.npz")
    with open(log, "a") as f:
        resumed = subprocess.run(_cli("resume", str(run_dir), "--address", cluster.address),
                                 stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 timeout=timeout)
    if resumed.returncode != 0:
        raise FaultError(f"dqd-ray resume failed (rc {resumed.returncode}):\n"
                         f"{log.read_text()[-3000:]}")
    m = _metrics(run_dir)
    first_after = next((x for x in m if x["iteration"] == int(manifest["iteration"]) + 1), {})
    return {
        "killed_after_iteration": killed_at,
        "resumed_from_iteration": int(manifest["iteration"]),
        "resumed_from_checkpoint": path.name,
        # The archive the resumed run starts from: its first iteration's elites
        # (an archive never loses a cell, so fewer would mean elites were lost).
        "elites_first_iteration_after_resume": first_after.get("num_elites"),
        "resume_line": next((ln for ln in _lines(log) if ln.startswith("resumed from")), None),
        "iterations": [x["iteration"] for x in m],
        "iterations_unique": [x["iteration"] for x in m] == list(range(1, iterations + 1)),
        "checkpoint_elites": len(saved),
        **_elites_kept(run_dir, [saved]),
    }


def _scenario_wait(cluster, work: Path, preset: str, extra: list[str],
                   timeout: float) -> dict[str, Any]:
    common = [*SMALL, *PLACED, "iterations=2", *extra]
    # A resource that never comes: a clear error after the configured wait.
    t0 = time.time()
    failed = subprocess.run(
        _cli("run", "--preset", preset, "--address", cluster.address,
             "--out", str(work / "wait_fail"),
             *_sets([*common, "resources.learner_resource=never_offered",
                     "resources.wait_for_resources_s=4"])),
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    fail_s = time.time() - t0
    error = next((ln for ln in _ANSI.sub("", failed.stderr).splitlines()
                  if ln.startswith("error:")), None)
    # A resource that arrives during the wait (an autoscaler adding a node).
    run_dir, log = work / "wait_late", work / "wait_late.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _cli("run", "--preset", preset, "--address", cluster.address, "--out", str(run_dir),
                 *_sets([*common, "resources.learner_resource=late_learner",
                         "resources.wait_for_resources_s=120"])),
            stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait(lambda: any("waiting up to" in ln for ln in _lines(log)), timeout,
                  "the run's waiting message", proc, log)
            t_added = time.time()
            cluster.add_node(num_cpus=1, resources={"late_learner": 1})
            _finish(proc, timeout, log)
            started_s = time.time() - t_added
        finally:
            if proc.poll() is None:
                proc.kill()
    return {
        "missing_resource_rc": failed.returncode,
        "missing_resource_error": error,
        "missing_resource_failed_after_s": round(fail_s, 1),
        "late_resource_waiting_line": next((ln for ln in _lines(log) if "waiting up to" in ln),
                                           None),
        "late_resource_autoscaler_line": next(
            (ln for ln in _lines(log) if "asked the autoscaler" in ln), None),
        "late_resource_iterations": [x["iteration"] for x in _metrics(run_dir)],
        "late_resource_finished_s_after_node": round(started_s, 1),
    }


CRASH_SCRIPT = """
import os, signal, sys
import numpy as np
from dqd_ray.state import checkpoint
from dqd_ray.cli import main

crash_at = sys.argv[1]
real = np.savez

def savez(path, *a, **kw):
    # Dies halfway through writing the checkpoint of iteration crash_at.
    if f"_ckpt_{int(crash_at):07d}_" in str(path) and str(path).endswith("archive.npz"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *a, **kw)

checkpoint.np.savez = savez
sys.exit(main(sys.argv[2:]))
"""


def _scenario_checkpoint(work: Path, preset: str, iterations: int, extra: list[str],
                         timeout: float) -> dict[str, Any]:
    from dqd_ray.state import checkpoint as ckpt

    run_dir = work / "checkpoint"
    log = work / "checkpoint.log"
    crash_at = 4
    args = [sys.executable, "-c", CRASH_SCRIPT, str(crash_at), "run", "--preset", preset,
            "--local-inprocess", "--out", str(run_dir),
            *_sets([*SMALL, "resources.num_rollout_workers=1", f"iterations={iterations}",
                    "checkpoint.every=2", *extra])]
    with open(log, "w") as f:
        rc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            timeout=timeout).returncode
    root = run_dir / "checkpoints"
    left = sorted(p.name for p in root.iterdir())
    found = ckpt.latest_valid(root)
    if found is None:
        raise FaultError(f"no readable checkpoint after the crash: {left}")
    with open(log, "a") as f:
        resumed = subprocess.run(_cli("resume", str(run_dir), "--local-inprocess"), stdout=f,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 timeout=timeout)
    if resumed.returncode != 0:
        raise FaultError(f"dqd-ray resume failed (rc {resumed.returncode}):\n"
                         f"{log.read_text()[-3000:]}")
    m = _metrics(run_dir)
    return {
        "crashed_writing_iteration": crash_at,
        "crash_rc": rc,
        "left_after_crash": left,
        "readable_after_crash": found[0].name,
        "iterations": [x["iteration"] for x in m],
        "iterations_unique": [x["iteration"] for x in m] == list(range(1, iterations + 1)),
        "left_after_resume": sorted(p.name for p in root.iterdir()),
    }


def _start_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_HEALTH})
    for role, kw in (("rollout_a", {"num_cpus": 1, "resources": {"rollout": 1}}),
                     ("rollout_b", {"num_cpus": 1, "resources": {"rollout": 1}}),
                     ("learner_a", {"num_cpus": 1, "resources": {"learner": 1}}),
                     ("replay_a", {"num_cpus": 0, "resources": {"replay": 1}})):
        node = cluster.add_node(**kw)
        node.dqd_role = role
    cluster.wait_for_nodes()
    return cluster


def run(scenarios: list[str] | None = None, preset: str = "cma_mega_td3", iterations: int = 12,
        sets: list[str] | None = None, out: str | None = None, json_path: str | None = None,
        timeout_s: float = 300.0) -> dict[str, Any]:
    """Runs the scenarios; returns (and prints, and optionally writes) what survived."""
    import tempfile

    scenarios = list(scenarios or SCENARIOS)
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(f"unknown scenario(s) {bad}; choose from {list(SCENARIOS)}")
    if iterations < 8:
        raise ValueError(f"iterations must be >= 8 (three faults need room), got {iterations}")
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="dqd_ray_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    extra = list(sets or [])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results: dict[str, Any] = {"machine": machine_info(), "preset": preset,
                               "iterations": iterations, "work_dir": str(work)}
    cluster = None
    try:
        for name in scenarios:
            t0 = time.time()
            print(f"scenario {name} ...", flush=True)
            if name in ("nodes", "driver", "wait") and cluster is None:
                cluster = _start_cluster()
            if name == "nodes":
                res = _scenario_nodes(cluster, work, preset, iterations, extra, timeout_s)
            elif name == "driver":
                res = _scenario_driver(cluster, work, preset, iterations, extra, timeout_s)
            elif name == "wait":
                res = _scenario_wait(cluster, work, preset, extra, timeout_s)
            else:
                res = _scenario_checkpoint(work, preset, iterations, extra, timeout_s)
            res["wall_s"] = round(time.time() - t0, 1)
            # Ray's warning about restartable actors whose constructor arguments
            # sit in the object store (ray-project/ray#53727), in every run's log.
            res["restart_argument_warnings_all_logs"] = sum(
                p.read_text(errors="replace").count(
                    "has constructor arguments in the object store")
                for p in work.glob(f"{name}*.log"))
            results[name] = res
            print(json.dumps({name: res}, indent=1, default=str), flush=True)
    finally:
        if cluster is not None:
            cluster.shutdown()
    write_json(json_path, results)
    return results
