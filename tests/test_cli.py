"""The `dqd-ray` command: in-process runs, resume, bad input (stop signals: test_loop)."""

from __future__ import annotations

import pytest

from dqd_ray.cli import main
from dqd_ray.loop import read_metrics

TINY = ["env.episode_length=40", "algorithm.batch_size=4", "td3.batch_size=32",
        "td3.critic_hidden_sizes=[32,32]", "td3.train_steps_per_iteration=5",
        "td3.jacobian_states=32", "td3.learning_starts=32", "td3.replay_capacity=20000",
        "resources.envs_per_worker=2", "checkpoint.every=2", "logging.progress_bar=false"]


def sets(*extra):
    out = []
    for s in [*TINY, *extra]:
        out += ["--set", s]
    return out


def test_local_inprocess_run_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--local-inprocess", "--preset", "cma_mega_td3", "--out", str(out),
                 *sets("iterations=3")]) == 0
    printed = capsys.readouterr().out
    assert f"run directory: {out}" in printed and "QD score" in printed
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["greedy_inserted"] >= 1 or metrics[-1]["num_elites"] > 0
    assert main(["resume", str(out), "--local-inprocess", "--set", "iterations=5"]) == 0
    assert [m["iteration"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--local-inprocess", "--out", str(out), *sets("iterations=1")]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", "--local-inprocess", "--out", str(out), *sets("iterations=1")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


def test_bad_preset_and_set_syntax(capsys):
    assert main(["run", "--preset", "cma_mega_sgd"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["run", "--set", "iterations"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["run", "--set", "td3.batch_size=-4"]) == 2
    assert "td3.batch_size" in capsys.readouterr().err


# -- bad arguments: a message and exit code 2 before any work starts ----------------------

def _refuse_work(monkeypatch):
    """Every command's work entry point fails the test if it is reached: a bad
    argument must be refused before an env, a Ray, a run directory or a run's
    checkpoint is touched."""
    import dqd_ray.analysis.results
    import dqd_ray.analysis.show
    import dqd_ray.envs
    import dqd_ray.loop
    import dqd_ray.runtime.placement

    def started(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} was reached despite a bad argument")
        return fail

    for module, name in [(dqd_ray.envs, "make_env"), (dqd_ray.loop, "init_ray"),
                         (dqd_ray.runtime.placement, "init_ray"),
                         (dqd_ray.loop.Experiment, "create"), (dqd_ray.loop.Experiment, "resume"),
                         (dqd_ray.analysis.results, "render_elite"),
                         (dqd_ray.analysis.results, "load_run"),
                         (dqd_ray.analysis.show, "robustness_command")]:
        monkeypatch.setattr(module, name, started(name))


BAD_ARGS = [
    (["demo", "--env", "QDSnake-v0"],
     ("--env 'QDSnake-v0' is not a QD environment: choose one of QDAntBulletEnv-v0, "
      "QDHalfCheetahBulletEnv-v0, QDHopperBulletEnv-v0, QDWalker2DBulletEnv-v0")),
    (["demo", "--episodes", "0"], "--episodes must be at least 1, got 0"),
    (["demo", "--episodes", "-2"], "--episodes must be at least 1, got -2"),
    (["demo", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["run", "--out", "{tmp}/taken"],
     ("--out {tmp}/taken is an existing file, not a directory: pass the path of a new run "
      "directory")),
    (["run", "--out", "{tmp}/taken/run"],
     "--out {tmp}/taken/run lies under {tmp}/taken, which is a file, not a directory"),
    (["run", "--out", "{tmp}/run", "--num-cpus", "0"], "--num-cpus must be at least 1, got 0"),
    (["run", "--out", "{tmp}/run", "--config", "{tmp}"],
     "config file {tmp} is not a file: pass a YAML file"),
    (["run", "--out", "{tmp}/run", "--config", "{tmp}/taken"],
     "config file {tmp}/taken must hold a mapping at the top level"),
    (["run", "--out", "{tmp}/run", "--set", "td3.batch_size=[1,"],
     "--set 'td3.batch_size=[1,': the value is not valid YAML"),
    (["run", "--out", "{tmp}/run", "--set", "resources.num_rollout_workers=0"],
     ("resources.num_rollout_workers: Value error, a run needs at least 1 rollout worker, "
      "got 0: set a positive number, or leave it unset (null)")),
    (["resume", "{tmp}/run", "--num-cpus", "-1"], "--num-cpus must be at least 1, got -1"),
    (["render", "{tmp}/run", "--frame-every", "0"],
     "--frame-every must be at least 1, got 0: pass the env steps per GIF frame"),
    (["render", "{tmp}/run", "--frame-every", "-3"], "--frame-every must be at least 1, got -3"),
    (["render", "{tmp}/run", "--steps", "0"],
     "--steps must be at least 1, got 0: pass the episode steps to render, or leave it out"),
    (["render", "{tmp}/run", "--steps", "-5"], "--steps must be at least 1, got -5"),
    (["render", "{tmp}/run", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["render", "{tmp}/run", "--out", "{tmp}"],
     "--out {tmp} is a directory, not a file: pass the path of the GIF file to write"),
    (["render", "{tmp}/run", "--measures", "nan,0.5"],
     "--measures takes comma-separated finite numbers, got 'nan,0.5'"),
    (["robustness", "{tmp}/run", "--episodes", "0"],
     "--episodes must be at least 1, got 0: pass the new-seed episodes per elite"),
    (["robustness", "{tmp}/run", "--episodes", "-1"], "--episodes must be at least 1, got -1"),
    (["robustness", "{tmp}/run", "--seed", "-7"], "--seed must be at least 0, got -7"),
    (["robustness", "{tmp}/run", "--num-cpus", "0"], "--num-cpus must be at least 1, got 0"),
    (["robustness", "{tmp}/run", "--out", "{tmp}/taken"],
     ("--out {tmp}/taken is an existing file, not a directory: pass a directory for "
      "robustness.json")),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_bad_arguments_are_refused_before_any_work(tmp_path, monkeypatch, capsys, argv,
                                                    message):
    (tmp_path / "taken").write_text("a file, not a directory\n")
    _refuse_work(monkeypatch)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message.replace("{tmp}", str(tmp_path)) in captured.err
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    # Nothing was written: no run directory, no GIF, no robustness files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (tmp_path / "taken").read_text() == "a file, not a directory\n"
