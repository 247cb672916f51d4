"""The `dqd-ray` command: in-process runs, resume, bad input (stop signals: test_loop)."""

from __future__ import annotations

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
