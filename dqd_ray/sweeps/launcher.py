"""Starting, resuming and dry-running a sweep, and collecting its results."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from dqd_ray.config import (
    ConfigError,
    ExperimentConfig,
)
from dqd_ray.runtime.resources import check_fits, describe_bundles
from dqd_ray.sweeps.file import PBTScheduler, Sweep
from dqd_ray.sweeps.trial import (
    make_scheduler,
    make_trainable,
    sweep_runtime_env,
)


def _cluster_view() -> tuple[dict, list[dict]]:
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def dry_run_report(sweep: Sweep, out=print) -> None:
    tc = sweep.spec.tune_config
    grid = sweep.grid_points()
    out(f"sweep {sweep.name}: {sweep.num_trials()} trials ({len(grid)} grid points x "
        f"num_samples {tc.num_samples}); scheduler {tc.scheduler.name}; "
        f"{tc.mode} {tc.metric}")
    out(f"experiment directory: {sweep.experiment_dir()}")
    for i, point in enumerate(grid):
        cfg = sweep.trial_config(point)
        label = ", ".join(f"{k}={v}" for k, v in point.items()) or "(every trial)"
        out(f"  grid point {i}: {label}")
        out(f"    bundles: {describe_bundles(sweep.bundles(cfg), cfg)}")
    sampled = [p for p in sweep.params if p.kind not in ("grid_search", "constant")]
    for p in sampled:
        out(f"  sampled per trial: {p.path} ~ {p.kind}{list(p.args)}")


def _final_rows(results) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id"), "trial_dir": r.path,
               "status": "ERROR" if r.error else "OK"}
        row.update({f"config/{k}": v for k, v in (r.config or {}).items()})
        row.update({k: v for k, v in m.items()
                    if isinstance(v, (int, float, str)) and k not in ("trial_id",)
                    and not k.startswith("config")})
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def check_experiment_dir_private(exp_dir: Path, limit: int = 5) -> None:
    """Refuses to resume from an experiment directory someone else could have changed.

    ``Tuner.restore`` unpickles Tune's own state from the experiment
    directory (``tuner.pkl``; ``experiment_state-*.json``,
    ``basic-variant-state-*.json``, ``searcher-state-*.pkl`` and
    ``callback-states-*.pkl`` hold cloudpickle payloads too, and a trial's
    ``error.pkl`` is unpickled when its error is read), and the trials then
    load their checkpoints from the trial directories: whoever can write any
    of it can run code as this user. So the directory, and every directory
    and file under it (symlinks followed), must be owned by this user and
    writable by neither group nor others (``mode & 0o022 == 0``).

    Raises:
        ConfigError: Naming up to ``limit`` offending paths, why, and the fix.
    """
    uid = os.getuid()
    bad: list[str] = []

    def check(p: Path) -> None:
        try:
            st = os.stat(p)
        except FileNotFoundError:  # a dangling link, or removed while walking
            return
        why = []
        if st.st_uid != uid:
            why.append(f"owned by uid {st.st_uid}, not you (uid {uid})")
        if st.st_mode & 0o022:
            who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002))
                               if st.st_mode & bit)
            why.append(f"writable by {who} (mode {st.st_mode & 0o7777:o})")
        if why:
            bad.append(f"{p}: {', '.join(why)}")

    check(exp_dir)
    seen = set()
    for root, dirs, files in os.walk(exp_dir, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # a link loop: walked already
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for name in dirs + files:
            check(Path(root) / name)
    if bad:
        more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
        raise ConfigError(
            f"refusing to resume {exp_dir}: Tune's own state there is a pickle (tuner.pkl "
            "and others), which runs code when loaded, so the experiment directory and "
            "everything in it must be yours and writable by no one else. Found: "
            + "; ".join(bad[:limit]) + more + f". If nobody else could have changed it, "
            f"fix it with `chmod -R go-w {exp_dir}` (files owned by another user: copy the "
            "directory as yourself and resume the copy)")


def run_sweep(path: str | Path, sets: list[str] | None = None, *, address: str | None = None,
              num_cpus: int | None = None, resume: bool = False, dry_run: bool = False,
              verbose: int = 1) -> dict:
    """Validates and runs (or resumes) a sweep; returns a summary dict.

    Raises:
        ConfigError: A bad sweep file, or a trial that cannot fit the cluster.
    """
    sets = list(sets or [])
    sweep = Sweep(path, sets)
    exp_dir = sweep.experiment_dir()
    if dry_run:
        dry_run_report(sweep)
    if dry_run and not resume and (exp_dir / "sweep.yaml").exists():
        print(f"note: {exp_dir} already holds this sweep: run it with --resume, or under "
              "another name (--set name=...)")
    elif not resume and (exp_dir / "sweep.yaml").exists():
        raise ConfigError(f"{exp_dir} already holds this sweep: continue it with --resume, or "
                          "choose another name (--set name=...)")
    if resume:
        if exp_dir.exists():  # before anything there is read, Tuner.restore above all
            check_experiment_dir_private(exp_dir)
        if not (exp_dir / "sweep.yaml").exists():
            raise ConfigError(f"{exp_dir} holds no sweep to resume (run it without --resume "
                              "first)")
        started = (yaml.safe_load((exp_dir / "sweep.yaml").read_text()),
                   json.loads((exp_dir / "sweep_sets.json").read_text()))
        if started != (yaml.safe_load(sweep.path.read_text()), sets):
            raise ConfigError(f"{sweep.path} or its --set overrides differ from those "
                              f"{exp_dir} was started with ({exp_dir / 'sweep.yaml'}, "
                              f"{exp_dir / 'sweep_sets.json'}): resume with the same ones")
    if dry_run and not address:
        import torch

        local = {"CPU": float(num_cpus or os.cpu_count() or 1),
                 "GPU": float(torch.cuda.device_count())}
        for cfg in _distinct_configs(sweep):
            try:
                check_fits(sweep.bundles(cfg), local, [local], "this machine")
            except ConfigError as err:
                print(f"note: {err} (fine for a cluster: pass --address to check against it)")
        return {"sweep": sweep.name, "trials": sweep.num_trials(), "dry_run": True}

    from ray import tune

    from dqd_ray.loop import init_ray

    runtime_env = sweep_runtime_env()
    init_ray(address, num_cpus, runtime_env=runtime_env)
    cluster, nodes = _cluster_view()
    where = f"the cluster at {address}" if address else "this Ray instance"
    for cfg in _distinct_configs(sweep):
        check_fits(sweep.bundles(cfg), cluster, nodes, where)
    if dry_run:
        print(f"every trial fits {where}")
        return {"sweep": sweep.name, "trials": sweep.num_trials(), "dry_run": True}

    tc = sweep.spec.tune_config
    trainable = make_trainable(sweep, runtime_env["env_vars"].get("WANDB_MODE"))
    keep = sweep.spec.trial.checkpoints_to_keep
    if keep is None and not isinstance(tc.scheduler, PBTScheduler):
        keep = max(2, min(c.checkpoint.keep for c in sweep.base_configs.values()))
    run_config = tune.RunConfig(
        name=sweep.name, storage_path=str(sweep.storage_path()),
        failure_config=tune.FailureConfig(max_failures=sweep.spec.trial.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep), verbose=verbose)
    if resume:
        print(f"resuming sweep {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(sweep.path, exp_dir / "sweep.yaml")
        (exp_dir / "sweep_sets.json").write_text(json.dumps(sets))
        tuner = tune.Tuner(
            trainable, param_space=sweep.param_space(), run_config=run_config,
            tune_config=tune.TuneConfig(
                metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples,
                scheduler=make_scheduler(sweep), max_concurrent_trials=tc.max_concurrent_trials,
                time_budget_s=tc.time_budget_s))
    t0 = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - t0
    rows = _final_rows(results)
    write_csv(rows, exp_dir / "results.csv")
    summary = {"sweep": sweep.name, "experiment_dir": str(exp_dir), "wall_s": wall,
               "trials": len(rows), "errors": sum(r["status"] == "ERROR" for r in rows),
               "csv": str(exp_dir / "results.csv")}
    try:
        best = results.get_best_result(metric=tc.metric, mode=tc.mode, scope="last")
    except RuntimeError:
        best = None
    if best is not None and best.metrics:
        keys = ("iteration", "evaluations", "qd_score", "norm_qd_score", "coverage",
                "best_fitness", tc.metric)
        summary["best"] = {"trial_dir": best.path, "config": best.config,
                           "metrics": {k: best.metrics.get(k) for k in dict.fromkeys(keys)}}
        print(f"\nbest trial ({tc.mode} {tc.metric}): {best.path}")
        print("  config: " + json.dumps(best.config, sort_keys=True, default=str))
        print("  metrics: " + json.dumps(summary["best"]["metrics"], default=str))
    print(f"{len(rows)} trials, {summary['errors']} errored, {wall:.0f} s; final metrics of "
          f"every trial: {exp_dir / 'results.csv'}")
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _distinct_configs(sweep: Sweep) -> list[ExperimentConfig]:
    """One config per distinct set of trial bundles over the grid points."""
    out: dict[str, ExperimentConfig] = {}
    for point in sweep.grid_points():
        cfg = sweep.trial_config(point)
        out.setdefault(json.dumps(sweep.bundles(cfg)), cfg)
    return list(out.values())

