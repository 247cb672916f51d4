"""Ray Tune sweeps: sweep-file validation, trial bundles, and real sweeps on a
real local Ray (ASHA, PBT, resume, retry after a crash, wandb offline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from wandb_records import wandb_history

from dqd_ray.cli import main
from dqd_ray.config import ConfigError, build_config
from dqd_ray.loop import read_metrics
from dqd_ray.sweeps import Sweep, check_fits, parse_param, run_sweep, trial_bundles

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "tune_configs").glob("*.yaml"))

# A trial small enough for tests: short episodes, tiny critics, 1 rollout worker.
TINY = {
    "iterations": 4, "env.episode_length": 40, "algorithm.batch_size": 3,
    "td3.critic_hidden_sizes": [16, 16], "td3.batch_size": 16, "td3.learning_starts": 16,
    "td3.train_steps_per_iteration": 2, "td3.jacobian_states": 16,
    "td3.replay_capacity": 5000, "resources.envs_per_worker": 2,
    # Heatmaps only where a test looks for one (the quick sweep sets its own):
    # each costs a driver 0.4 s, and the 40-iteration sweep would draw 80.
    "checkpoint.every": 2, "logging.heatmap_every": 1000,
    # Async learners (the default) wait for new experience past 8 sampled
    # transitions per transition added, instead of taking a core each.
    "td3.async_replay_ratio": 8,
}


def write_sweep(path: Path, **sections) -> Path:
    spec = {
        "name": "t", "storage_path": str(path.parent / "storage"),
        "base": {"preset": "cma_mega_td3",
                 "set": {"resources.num_rollout_workers": 1, **TINY}},
        "param_space": {"algorithm.sigma0": {"grid_search": [0.1, 0.5]}},
        "tune_config": {"metric": "qd_score", "mode": "max"},
        "trial": {"driver_cpus": 0, "max_failures": 0},
    }
    for k, v in sections.items():
        spec[k] = v
    path.write_text(yaml.safe_dump(spec))
    return path


# -- validation (no Ray) -------------------------------------------------------------


def test_shipped_sweeps_exist():
    names = {p.stem for p in SWEEPS}
    assert {"quick_local", "asha_cma_mega_td3_es_ant", "pbt_td3",
            "grid_algorithms_seeds"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_shipped_sweep_passes_dry_run(path, capsys):
    assert main(["tune", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "bundles:" in out and "rollout {CPU:" in out


def test_paper_sweeps_use_the_paper_presets():
    asha = Sweep(ROOT / "tune_configs/asha_cma_mega_td3_es_ant.yaml")
    assert asha.spec.base.preset == "cma_mega_td3_es"
    assert {p.path for p in asha.params} == {"algorithm.sigma0", "algorithm.lr", "td3.lr"}
    assert asha.spec.tune_config.scheduler.name == "asha"
    cfg = asha.base_configs["cma_mega_td3_es"]
    assert cfg.env.id == "QDAntBulletEnv-v0" and cfg.td3.train_steps_per_iteration == 600
    grid = Sweep(ROOT / "tune_configs/grid_algorithms_seeds.yaml")
    assert grid.num_trials() == 20
    assert {p for p in grid.presets()} == {"cma_mega_td3_es", "cma_mega_es", "pga_me",
                                           "map_elites"}
    pbt = Sweep(ROOT / "tune_configs/pbt_td3.yaml")
    assert pbt.spec.tune_config.scheduler.name == "pbt"
    assert all(m.path.startswith("td3.") for m in pbt.mutations)


def test_trial_bundles_follow_the_config():
    cfg = build_config("cma_mega_td3", sets=["resources.num_rollout_workers=3",
                                             "resources.num_learners=2"])
    assert trial_bundles(cfg, 1) == [{"CPU": 1.0}] + [{"CPU": 1.0}] * 3 + [{"CPU": 1.0}] * 2
    gpu = build_config("cma_mega_td3_es", sets=["resources.num_rollout_workers=2",
                                                "resources.num_gpus_per_learner=0.5",
                                                "resources.cpus_per_worker=0.5"])
    assert trial_bundles(gpu, 0) == [{}, {"CPU": 0.5}, {"CPU": 0.5}, {"GPU": 0.5}]
    me = build_config("map_elites", sets=["resources.num_rollout_workers=2"])
    assert trial_bundles(me, 1) == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}]  # no learner


def test_fit_check_names_the_missing_resource():
    bundles = [{"CPU": 1.0}, {"CPU": 1.0}, {"GPU": 1.0}]
    with pytest.raises(ConfigError, match="needs 1 GPU but the cluster has 0"):
        check_fits(bundles, {"CPU": 8.0}, [{"CPU": 8.0}], "the cluster")
    with pytest.raises(ConfigError, match="needs 2 CPU but the cluster has 1"):
        check_fits(bundles[:2], {"CPU": 1.0}, [{"CPU": 1.0}], "the cluster")
    with pytest.raises(ConfigError, match="no node"):
        check_fits([{"CPU": 4.0}], {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}], "the cluster")
    check_fits(bundles, {"CPU": 2.0, "GPU": 1.0}, [{"CPU": 2.0, "GPU": 1.0}], "the cluster")


def test_samplers_parse_and_reject():
    assert parse_param("td3.lr", {"loguniform": [1e-4, 1e-3]}).candidates() == [1e-4, 1e-3]
    assert parse_param("seed", {"randint": [0, 10]}).candidates() == [0, 9]
    assert parse_param("seed", 3).kind == "constant"
    for spec, msg in [({"lognormal": [0, 1]}, "unknown sampler 'lognormal'"),
                      ({"uniform": [1, 0]}, "low < high"),
                      ({"loguniform": [0, 1]}, "low > 0"),
                      ({"quniform": [0, 1]}, r"\[low, high, q\]"),
                      ({"choice": []}, "non-empty list"),
                      ({"uniform": [0, 1], "choice": [1]}, "one key")]:
        with pytest.raises(ConfigError, match=msg):
            parse_param("td3.lr", spec)


@pytest.mark.parametrize("sections, msg", [
    ({"tune_config": {"metric": "qd_score", "mode": "max", "schedulr": {}}}, "schedulr"),
    ({"param_space": {"td3.lr": {"unifrom": [0.1, 0.2]}}}, "unknown sampler 'unifrom'"),
    ({"param_space": {"td3.learning_rate": {"choice": [0.1]}}},
     "td3.learning_rate is not a setting"),
    ({"param_space": {"td3.batch_size": {"grid_search": [64, -1]}}},
     r"td3.batch_size=-1(.|\n)*greater than 0"),
    ({"param_space": {"td3.tau": {"uniform": [0.5, 1.5]}}}, r"td3.tau=1.5"),
    ({"tune_config": {"metric": "qd_scor"}}, "metric 'qd_scor' is not reported"),
    ({"param_space": {"preset": {"grid_search": ["map_elites", "cma_mega_td3"]}},
      "tune_config": {"metric": "td3_lr"}}, "not all presets report it"),
    ({"tune_config": {"scheduler": {"name": "pbt", "perturbation_interval": 3,
                                    "hyperparam_mutations": {"td3.lr": {"choice": [1e-3]}}}}},
     "multiple of checkpoint.every=2"),
    ({"tune_config": {"scheduler": {"name": "pbt", "perturbation_interval": 2,
                                    "hyperparam_mutations": {"algorithm.lr": {
                                        "uniform": [0.1, 1]}}}}}, "PBT cannot mutate algorithm.lr"),
    ({"tune_config": {"scheduler": {"name": "asha", "grace_period": 4}}}, "grace_period=4"),
    ({"base": {"preset": "cma_mega_td3", "set": {"iterations": 3}}},
     "num_rollout_workers"),
])
def test_bad_sweep_files_fail_naming_the_problem(tmp_path, sections, msg):
    path = write_sweep(tmp_path / "s.yaml", **sections)
    with pytest.raises(ConfigError, match=msg):
        Sweep(path)
    assert main(["tune", str(path), "--dry-run"]) == 2  # the CLI: an error, no traceback


def test_sets_reach_the_sweep_or_the_base(tmp_path):
    path = write_sweep(tmp_path / "s.yaml")
    sweep = Sweep(path, ["tune_config.num_samples=3", "iterations=6",
                         "param_space.seed={grid_search: [1, 2]}", "name=other"])
    assert sweep.spec.tune_config.num_samples == 3 and sweep.name == "other"
    assert sweep.spec.base.set["iterations"] == 6
    assert Sweep(path, ["preset=cma_mega_es"]).trial_config({}).preset == "cma_mega_es"
    with pytest.raises(ConfigError, match="sigma0 is not a setting of the config"):
        Sweep(path, ["preset=map_elites"])  # the param_space no longer applies
    assert sweep.num_trials() == 2 * 2 * 3
    cfg = sweep.trial_config({"algorithm.sigma0": 0.5, "seed": 2})
    assert (cfg.iterations, cfg.seed, cfg.algorithm.sigma0) == (6, 2, 0.5)


def test_float_samples_of_integer_settings_are_rounded(tmp_path):
    sweep = Sweep(write_sweep(tmp_path / "s.yaml", param_space={
        "td3.batch_size": {"quniform": [16, 64, 16]}}))
    cfg = sweep.trial_config({"td3.batch_size": 32.0})
    assert cfg.td3.batch_size == 32 and isinstance(cfg.td3.batch_size, int)


# -- real sweeps on a real local Ray -------------------------------------------------




def _trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(p for p in exp_dir.iterdir() if p.is_dir() and (p / "run").exists())


@pytest.mark.slow
def test_a_trial_that_cannot_fit_fails_before_any_trial(ray_session, tmp_path):
    path = write_sweep(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="one trial needs 9 CPU"):
        run_sweep(path, ["resources.num_rollout_workers=8", "resources.num_learners=1"])
    assert not (tmp_path / "storage" / "t").exists()


@pytest.mark.slow
def test_quick_sweep_asha_stops_a_trial_and_logs_wandb(ray_session, tmp_path, capsys,
                                                       monkeypatch):
    """The shipped quick sweep, shrunk: two trials one after another; the
    second evaluates fewer solutions per iteration, so ASHA stops it at its
    first rung. Each trial has its own offline wandb run with an image."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    storage = tmp_path / "storage"
    sets = [f"storage_path={storage}", "iterations=4", "env.episode_length=40",
            "algorithm.batch_size=6", "td3.critic_hidden_sizes=[16,16]",
            "td3.batch_size=16", "td3.learning_starts=16", "td3.jacobian_states=16",
            "td3.train_steps_per_iteration=2", "resources.envs_per_worker=2",
            "logging.heatmap_every=2", "param_space.algorithm.sigma0=0.5",
            "param_space.algorithm.batch_size={grid_search: [6, 2]}",
            "tune_config.metric=evaluations", "tune_config.max_concurrent_trials=1",
            "tune_config.scheduler={name: asha, grace_period: 2, reduction_factor: 2}"]
    rc = main(["tune", str(ROOT / "tune_configs/quick_local.yaml"), *[
        x for s in sets for x in ("--set", s)]])
    out = capsys.readouterr().out
    assert rc == 0, out
    exp = storage / "quick_local"
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["errors"] == 0
    assert "best trial (max evaluations)" in out and '"algorithm.batch_size": 6' in out
    assert summary["best"]["config"]["algorithm.batch_size"] == 6
    rows = (exp / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "config/algorithm.batch_size" in rows[0]
    trials = _trial_dirs(exp)
    assert len(trials) == 2
    iterations = {}
    for t in trials:
        cfg = yaml.safe_load((t / "run" / "config.yaml").read_text())
        iterations[cfg["algorithm"]["batch_size"]] = len(read_metrics(t / "run"))
        runs = list((t / "run" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1  # one wandb run per trial
        files = list((runs[0] / "files").rglob("*"))
        assert any(p.suffix == ".png" for p in files)  # the archive heatmap
        (log,) = runs[0].glob("*.wandb")
        history = wandb_history(log)
        assert history and all("qd_score" in row for row in history)
    assert iterations == {6: 4, 2: 2}  # the weaker trial stopped at ASHA's first rung


@pytest.mark.slow
def test_pbt_exploit_restores_another_trials_checkpoint_with_new_config(ray_session, tmp_path):
    """Two trials, synchronous PBT (a perturbation step at iteration 3, whether
    or not the trials run at the same time; 4 iterations): the one with
    more critic updates (the metric is minimized) copies the other's
    checkpoint, then trains from the donor's state at its new (perturbed)
    learning rate."""
    path = write_sweep(
        tmp_path / "s.yaml",
        param_space={"td3.train_steps_per_iteration": {"grid_search": [1, 6]},
                     "td3.lr": 3e-4},
        tune_config={"metric": "critic_updates_total", "mode": "min",
                     "max_concurrent_trials": 2,
                     "scheduler": {"name": "pbt", "perturbation_interval": 2,
                                   "quantile_fraction": 0.5, "synch": True,
                                   "burn_in_period": 3,
                                   "resample_probability": 0.0,
                                   "hyperparam_mutations": {"td3.lr": {
                                       "loguniform": [1e-5, 1e-2]}}}})
    summary = run_sweep(path, ["iterations=4", "checkpoint.every=1",
                               "resources.learner_mode=sync",
                               "resources.cpus_per_worker=0.5",
                               "resources.cpus_per_learner=0.5"])
    assert summary["errors"] == 0
    trials = _trial_dirs(tmp_path / "storage" / "t")
    restores = []
    for t in trials:
        log = t / "run" / "restores.jsonl"
        if log.exists():
            restores += [(t, json.loads(line)) for line in log.read_text().splitlines()]
    # An exploit at the last iteration has no iteration after it to check.
    exploits = [(t, r) for t, r in restores
                if not r["checkpoint"].startswith(str(t)) and r["iteration"] < 4]
    assert exploits, f"no PBT exploit happened before the last iteration: {restores}"
    t, r = exploits[0]
    it = r["iteration"]
    donor = next(d for d in trials if r["checkpoint"].startswith(str(d)))
    # "td3.lr: run has <the checkpoint's>, requested <the new value>"
    (change,) = [c for c in r["changed"] if c.startswith("td3.lr:")]
    saved_lr = float(change.split("run has ")[1].split(",")[0])
    new_lr = float(change.split("requested ")[1])
    assert new_lr != pytest.approx(saved_lr)  # perturbed on exploit
    own = [json.loads(line) for name in ("metrics.jsonl", "metrics.abandoned.jsonl")
           if (t / "run" / name).exists()
           for line in (t / "run" / name).read_text().splitlines()]
    metrics = {m["iteration"]: m for m in read_metrics(t / "run")}
    assert metrics[it + 1]["td3_lr"] == pytest.approx(new_lr)  # in effect after the restore
    # The state came from the donor (1 update per iteration), not the trial's own (6).
    donor_metrics = {m["iteration"]: m for m in read_metrics(donor / "run")}
    own_before = max(m["critic_updates_total"] for m in own if m["iteration"] == it)
    assert (donor_metrics[it]["critic_updates_total"] < metrics[it + 1]["critic_updates_total"]
            < own_before + 6)


def _wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _checkpoints(exp: Path) -> list[Path]:
    return list(exp.glob("*/checkpoint_*")) if exp.exists() else []


def _checkpoints_in_tune_state(exp: Path) -> int:
    """Trials whose checkpoint Tune's driver has processed and synced to storage
    (a row of the trial's progress.csv names it). A checkpoint directory alone
    is not enough: a trial writes it before the driver records it, and an
    interrupt in between leaves a trial that Tune restarts from scratch."""
    import csv

    done = 0
    for progress in exp.glob("*/progress.csv") if exp.exists() else []:
        try:
            rows = list(csv.DictReader(progress.open()))
        except (OSError, csv.Error):
            continue
        done += any(row.get("checkpoint_dir_name") for row in rows)
    return done


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_restarting_trials(ray_session, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", param_space={"seed": {"grid_search": [0, 1]}})
    # 40 short iterations: the slower trial to start reaches its first recorded
    # checkpoint long before the other finishes (with 8, on a loaded machine,
    # both trials had run to the end by then, and nothing was left to resume).
    n = 40
    sets = ["--set", f"iterations={n}", "--set", "tune_config.max_concurrent_trials=2",
            "--set", "preset=map_elites"]
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dqd_ray.cli", "tune", str(path), *sets,
                             "--address", address], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    exp = tmp_path / "storage" / "t"
    try:
        _wait_for(lambda: _checkpoints_in_tune_state(exp) == 2, 300,
                  "both trials' checkpoints in Tune's state")
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=180)[0]
    first = {t.name: len(read_metrics(t / "run")) for t in _trial_dirs(exp)}
    assert len(first) == 2 and all(k >= 2 for k in first.values()), (first, out[-3000:])
    assert any(k < n for k in first.values()), first  # something left to resume
    with pytest.raises(ConfigError, match="already holds this sweep"):
        run_sweep(path, [s for s in sets if s != "--set"])
    summary = run_sweep(path, [s for s in sets if s != "--set"], resume=True)
    assert summary["errors"] == 0 and summary["trials"] == 2
    for t in _trial_dirs(exp):
        metrics = read_metrics(t / "run")
        assert [m["iteration"] for m in metrics] == list(range(1, n + 1))
        assert not list(t.glob("run.failed-*"))
        if first[t.name] < n:  # continued from a checkpoint, not from scratch
            log = (t / "run" / "restores.jsonl").read_text().splitlines()
            assert json.loads(log[0])["iteration"] >= 2


@pytest.mark.slow
def test_a_crashed_actor_is_retried_from_the_last_checkpoint(ray_session, tmp_path):
    """FailureConfig: the coordinator actor is killed mid-run; Tune retries the
    trial, which continues from its last checkpoint."""
    import ray._private.state as ray_state

    path = write_sweep(tmp_path / "s.yaml", param_space={},
                       trial={"driver_cpus": 0, "max_failures": 1})
    spec = yaml.safe_load(path.read_text())
    spec["base"]["preset"] = "map_elites"
    path.write_text(yaml.safe_dump(spec))
    exp = tmp_path / "storage" / "t"
    killed: list[int] = []

    def kill_coordinator():
        _wait_for(lambda: _checkpoints(exp), 300, "the first checkpoint")
        for info in ray_state.actors().values():
            if info["ActorClassName"] == "Coordinator" and info["State"] == "ALIVE":
                os.kill(info["Pid"], signal.SIGKILL)
                killed.append(info["Pid"])

    thread = threading.Thread(target=kill_coordinator, daemon=True)
    thread.start()
    summary = run_sweep(path, ["iterations=8"])
    thread.join(timeout=5)
    assert killed, "no coordinator was killed"
    assert summary["errors"] == 0
    (trial,) = _trial_dirs(exp)
    restores = [json.loads(x) for x in (trial / "run" / "restores.jsonl").read_text().splitlines()]
    assert restores[0]["iteration"] >= 2 and restores[0]["checkpoint"].startswith(str(trial))
    assert [m["iteration"] for m in read_metrics(trial / "run")] == list(range(1, 9))


@pytest.mark.slow
def test_inside_a_placement_group_the_builder_sizes_from_its_bundles(ray_session):
    """In a trial, ``ray.cluster_resources()`` is the whole cluster: the graph
    is sized from the trial's bundles instead, and one that cannot fit them is
    an error (nothing would ever add CPUs to a placement group)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0)
    def workers_for(sets):
        from dqd_ray.runtime import resolve_resources

        return resolve_resources(build_config("map_elites", sets=sets), "ray")[0]

    pg = placement_group([{"CPU": 0.5}] * 3)
    ray.get(pg.ready(), timeout=60)
    try:
        inside = workers_for.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_capture_child_tasks=True))
        assert ray.get(inside.remote(["resources.cpus_per_worker=0.5"]), timeout=60) == 3
        assert ray.get(workers_for.remote(["resources.cpus_per_worker=0.5"]),
                       timeout=60) > 3  # outside: the whole cluster
        with pytest.raises(Exception, match="the trial's bundles must match"):
            ray.get(inside.remote(["resources.cpus_per_worker=0.5",
                                   "resources.num_rollout_workers=4"]), timeout=60)
    finally:
        remove_placement_group(pg)
