"""No secret leaves the user's environment: WANDB_API_KEY reaches no
runtime_env the project builds, and no file of a run or of a sweep's
experiment directory (config, metrics, checkpoints, wandb files, Tune's
state and results); with WANDB_MODE=offline wandb stays offline even with a
key. And ``dqd-ray tune --resume`` refuses an experiment directory (Tune's
state there is a pickle) that group or others could have written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from dqd_ray.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes hold ``secret``, as text or hex
    (Tune keeps cloudpickle payloads hex-encoded in its JSON state)."""
    needles = (secret.encode(), secret.encode().hex().encode())
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            if p.is_symlink() or not p.is_file():
                continue
            data = p.read_bytes()
            if any(n in data for n in needles):
                found.append(str(p))
    return found


def tiny_sweep(tmp_path: Path, storage: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "secrets", "storage_path": str(storage),
        "base": {"preset": "cma_mega_td3", "set": {"resources.num_rollout_workers": 1}},
        "param_space": {"algorithm.sigma0": 0.5},
        "tune_config": {"metric": "qd_score", "mode": "max"},
        "trial": {"driver_cpus": 0, "max_failures": 0},
    }))
    return path


# -- the runtime_env the project builds ------------------------------------------------


def test_sweep_runtime_env_never_carries_the_key(monkeypatch):
    from dqd_ray.sweeps import sweep_runtime_env, wandb_env

    sentinel = f"sentinel-{uuid.uuid4()}"
    monkeypatch.setenv("WANDB_API_KEY", sentinel)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert sweep_runtime_env() == {"env_vars": {}}  # each node decides from its own env
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert sweep_runtime_env() == {"env_vars": {"WANDB_MODE": "offline"}}
    assert sentinel not in json.dumps([sweep_runtime_env(), wandb_env()])


def test_run_sweep_starts_ray_with_a_runtime_env_without_the_key(tmp_path, monkeypatch):
    """What ``run_sweep`` hands to ``ray.init`` (stopped right there)."""
    import dqd_ray.loop
    from dqd_ray.sweeps import run_sweep

    sentinel = f"sentinel-{uuid.uuid4()}"
    monkeypatch.setenv("WANDB_API_KEY", sentinel)
    monkeypatch.setenv("WANDB_MODE", "offline")
    seen = {}

    class Stop(Exception):
        pass

    def fake_init_ray(address=None, num_cpus=None, runtime_env=None):
        seen["runtime_env"] = runtime_env
        raise Stop

    monkeypatch.setattr(dqd_ray.loop, "init_ray", fake_init_ray)
    with pytest.raises(Stop):
        run_sweep(tiny_sweep(tmp_path, tmp_path / "storage"), ["iterations=2"])
    assert seen["runtime_env"] == {"env_vars": {"WANDB_MODE": "offline"}}
    assert sentinel not in json.dumps(seen["runtime_env"])


def test_wandb_mode_offline_wins_over_a_key(monkeypatch):
    from dqd_ray.logging import wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "sentinel-key")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_mode() == "offline"


# -- a sweep and a run with a sentinel key, end to end ---------------------------------

TINY = ["iterations=2", "env.episode_length=30", "algorithm.batch_size=3",
        "td3.critic_hidden_sizes=[16,16]", "td3.batch_size=16", "td3.learning_starts=16",
        "td3.train_steps_per_iteration=2", "td3.jacobian_states=16",
        "td3.replay_capacity=5000", "resources.envs_per_worker=2",
        "resources.learner_mode=sync", "resources.cpus_per_worker=0.5",
        "resources.cpus_per_learner=0.5", "checkpoint.every=1",
        "logging.wandb=true", "logging.heatmap_every=1"]

DRIVER = """
import json, os, sys
import ray
from ray.core.generated import gcs_pb2

from dqd_ray.cli import main
from dqd_ray.sweeps import run_sweep

sweep, run_dir, out, sets = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
key = os.environ["WANDB_API_KEY"]
summary = run_sweep(sweep, sets, num_cpus=4, verbose=0)  # starts a local Ray
assert main(["run", "--preset", "cma_mega_td3", "--out", run_dir,
             *[x for s in sets for x in ("--set", s)]]) == 0


@ray.remote(num_cpus=0)
def probe():
    return {"runtime_env": ray.get_runtime_context().runtime_env,
            "worker_has_key": os.environ.get("WANDB_API_KEY") == key}


accessor = ray._private.state.state._connect_and_get_accessor()
jobs = [gcs_pb2.JobTableData.FromString(raw) for raw in accessor.get_job_table(
    skip_submission_job_info_field=True, skip_is_running_tasks_field=True)]
report = {
    "summary": summary,
    "driver_runtime_env": ray.get_runtime_context().runtime_env,
    "probe": ray.get(probe.remote()),
    "job_table": [str(j) for j in jobs],
    "job_runtime_envs": [j.config.runtime_env_info.serialized_runtime_env for j in jobs],
    "session_dir": ray._private.worker._global_node.get_session_dir_path(),
}
ray.shutdown()
with open(out, "w") as f:
    json.dump(report, f, default=str)
"""


@pytest.mark.slow
def test_a_sweep_and_a_run_with_a_key_leave_it_nowhere(tmp_path):
    """One Tune trial and one ``dqd-ray run`` (2 iterations each, wandb on) in a
    Ray this driver starts with WANDB_API_KEY=<sentinel> and WANDB_MODE=offline
    in its environment (as a cluster node would have them). The key stays in
    the processes' environment (a Ray worker has it, inherited) but is in no
    file of the run or the experiment directory, in no runtime_env of the job
    (as the driver and a task see it, and in the GCS job table), in no line of
    the output, and wandb wrote offline runs (it never went online)."""
    sentinel = f"sentinel-{uuid.uuid4()}"
    storage, run_dir, out = tmp_path / "storage", tmp_path / "run", tmp_path / "report.json"
    sweep = tiny_sweep(tmp_path, storage)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A Ray of its own: RAY_TMPDIR keeps it from joining a cluster another
    # `ray start` on this machine recorded in /tmp/ray (short: socket paths).
    ray_tmp = tempfile.mkdtemp(prefix="dqdsec", dir="/tmp")
    env.update(WANDB_API_KEY=sentinel, WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               RAY_TMPDIR=ray_tmp)
    try:
        proc = subprocess.run([sys.executable, str(driver), str(sweep), str(run_dir), str(out),
                               json.dumps(TINY)], env=env, capture_output=True, text=True,
                              timeout=420, cwd=tmp_path, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        report = json.loads(out.read_text())
        # Ray's own session logs (where a runtime_env would be logged) hold it nowhere.
        session_logs = Path(report["session_dir"]) / "logs"
        assert session_logs.is_dir() and not files_holding(session_logs, sentinel)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert report["summary"]["trials"] == 1 and report["summary"]["errors"] == 0
    assert report["probe"]["worker_has_key"]  # the node's own environment still has it
    assert sentinel not in proc.stdout + proc.stderr
    assert sentinel not in json.dumps(report)  # runtime_envs and the job table
    assert report["driver_runtime_env"].get("env_vars", {}) == {"WANDB_MODE": "offline"}

    exp = storage / "secrets"
    trial_runs = list(exp.glob("*/run"))
    assert len(trial_runs) == 1
    for d in (run_dir, trial_runs[0]):  # what was written, and so searched, below
        assert list(d.glob("wandb/offline-run-*/*.wandb")), d  # wandb ran, offline
        assert len((d / "metrics.jsonl").read_text().splitlines()) == 2
        assert (d / "config.yaml").exists()
    assert list(run_dir.glob("checkpoints/*"))
    assert list(exp.glob("*/checkpoint_*"))  # a trial's checkpoints go to Tune
    assert (exp / "tuner.pkl").exists() and list(exp.glob("experiment_state-*.json"))
    assert list(exp.glob("*/result.json")) and list(exp.glob("*/params.pkl"))
    assert not files_holding(tmp_path, sentinel)


# -- tune --resume refuses a directory others can write ------------------------------


def _experiment_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A sweep file and an experiment directory as a started sweep leaves it."""
    sweep = tiny_sweep(tmp_path, tmp_path / "storage")
    exp = tmp_path / "storage" / "secrets"
    (exp / "trial_0" / "checkpoint_000000").mkdir(parents=True)
    (exp / "sweep.yaml").write_text(sweep.read_text())
    (exp / "sweep_sets.json").write_text("[]")
    (exp / "tuner.pkl").write_bytes(b"not loaded")
    (exp / "experiment_state-2024-01-01_00-00-00.json").write_text("{}")
    (exp / "trial_0" / "checkpoint_000000" / "state.json").write_text("{}")
    for p in [exp, *exp.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return sweep, exp


def test_private_experiment_dir_passes(tmp_path):
    from dqd_ray.sweeps import check_experiment_dir_private

    _, exp = _experiment_dir(tmp_path)
    check_experiment_dir_private(exp)  # 0o755 directories, 0o644 files: fine
    (exp / "tuner.pkl").chmod(0o600)
    check_experiment_dir_private(exp)


@pytest.mark.parametrize("where, mode, who", [
    (".", 0o777, "group and others"),
    ("tuner.pkl", 0o666, "group and others"),
    ("experiment_state-2024-01-01_00-00-00.json", 0o664, "group"),
    ("trial_0", 0o757, "others"),
    ("trial_0/checkpoint_000000/state.json", 0o646, "others"),
])
def test_writable_experiment_dir_is_refused_naming_the_path(tmp_path, where, mode, who):
    from dqd_ray.sweeps import check_experiment_dir_private

    _, exp = _experiment_dir(tmp_path)
    target = (exp / where).resolve()
    target.chmod(mode)
    with pytest.raises(ConfigError) as err:
        check_experiment_dir_private(exp)
    msg = str(err.value)
    assert f"{target}: writable by {who} (mode {mode:o})" in msg
    assert "Tune's own state there is a pickle" in msg
    assert f"chmod -R go-w {exp}" in msg


def test_a_link_to_a_writable_file_is_refused(tmp_path):
    from dqd_ray.sweeps import check_experiment_dir_private

    _, exp = _experiment_dir(tmp_path)
    outside = tmp_path / "shared.pkl"
    outside.write_bytes(b"x")
    outside.chmod(0o666)
    (exp / "searcher-state-2024.pkl").symlink_to(outside)
    with pytest.raises(ConfigError, match="searcher-state-2024.pkl: writable by group and"):
        check_experiment_dir_private(exp)


def test_a_directory_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    from dqd_ray.sweeps import check_experiment_dir_private

    _, exp = _experiment_dir(tmp_path)
    me = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: me + 1)  # as seen by someone else
    with pytest.raises(ConfigError, match=rf"owned by uid {me}, not you \(uid {me + 1}\)"):
        check_experiment_dir_private(exp)


def test_tune_resume_refuses_before_tuner_restore(tmp_path, monkeypatch, capsys):
    """``dqd-ray tune --resume`` on a world-writable experiment directory: exit
    code 2 and the message, and neither Ray nor ``Tuner.restore`` is reached."""
    import ray.tune

    import dqd_ray.loop
    from dqd_ray.cli import main

    sweep, exp = _experiment_dir(tmp_path)
    (exp / "sweep.yaml").write_text(sweep.read_text())
    exp.chmod(0o777)
    reached = []
    monkeypatch.setattr(ray.tune.Tuner, "restore",
                        classmethod(lambda cls, *a, **k: reached.append("restore")))
    monkeypatch.setattr(dqd_ray.loop, "init_ray", lambda *a, **k: reached.append("ray"))
    assert main(["tune", str(sweep), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"error: refusing to resume {exp}" in err and "writable by group and others" in err
    assert "chmod -R go-w" in err and "Traceback" not in err
    assert reached == []
    exp.chmod(0o755)  # fixed as the message says: the check passes, Ray is next
    monkeypatch.setattr(dqd_ray.loop, "init_ray",
                        lambda *a, **k: (_ for _ in ()).throw(ConfigError("ray reached")))
    assert main(["tune", str(sweep), "--resume"]) == 2
    assert "ray reached" in capsys.readouterr().err
