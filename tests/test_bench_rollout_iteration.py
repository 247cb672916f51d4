"""`dqd-ray bench rollout` and `dqd-ray bench iteration` on tiny budgets: they run
through the real entry point, replay the same trajectories, and write their figures."""

from __future__ import annotations

import json

import pytest

from dqd_ray.cli import main


def test_bench_rollout_writes_ratios_and_the_time_split(ray_session, tmp_path, capsys):
    out = tmp_path / "rollout.json"
    assert main(["bench", "rollout", "--env", "QDHopperBulletEnv-v0", "--genomes", "2",
                 "--min-steps", "200", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["env"] == "QDHopperBulletEnv-v0" and row["steps"] >= 200
    assert row["policies"] == "random"
    assert row["ratio"] == pytest.approx(row["worker_steps_per_s"] / row["bare_steps_per_s"])
    assert 0 < row["ratio"] < 5 and row["physics_us"] > 0 and row["policy_us"] > 0
    # The same episodes through Ray, streamed to a replay actor (the path a run takes).
    assert 0 < row["ratio_streaming"] < 5 and 0 < row["ratio_4envs"] < 5
    for key in ("bare_reads_us", "env_python_us", "recording_us", "worker_loop_us",
                "env_reset_ms", "bare_reset_ms"):
        assert key in row
    worst = min(row["ratio"], row["ratio_4envs"], row["ratio_streaming"])
    assert data["goal_met"] == (worst >= 0.8)
    assert "goal (every path's ratio >= 0.8 on every env)" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_iteration_times_each_phase_and_projects_a_paper_run(ray_session, tmp_path,
                                                                   capsys):
    # On the session's Ray (the bench joins a Ray already up): a Ray the bench
    # started itself would outlive it with this machine's CPUs, too few for
    # the tests after it.
    out = tmp_path / "iteration.json"
    sets = ["algorithm.batch_size=6", "es.num_samples=6", "td3.train_steps_per_iteration=10",
            "td3.jacobian_states=256", "env.episode_length=40", "td3.learning_starts=50",
            "td3.batch_size=32", "td3.critic_hidden_sizes=[32,32]",
            "metrics.robustness_episodes=2", "resources.num_rollout_workers=1"]
    assert main(["bench", "iteration", "--iterations", "3", "--workers", "10", "100",
                 *[a for s in sets for a in ("--set", s)], "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    its = data["iterations"]
    assert [r["iteration"] for r in its] == [1, 2, 3]
    assert all(r["evaluations"] == 1 + 6 + 6 + 1 for r in its)  # theta, ES, branches, greedy
    assert its[-1]["critic_updates"] == 10 and its[-1]["critic_train_s"] > 0
    assert 0.0 <= its[-1]["overlap"] <= 1.0
    # Training runs through both halves: the shares hidden behind each and the
    # exposed wait add up to the whole.
    last = its[-1]
    assert last["hidden_half_1"] + last["hidden_half_2"] <= 1.0 + 1e-9
    assert 0.0 <= last["hidden_half_1"] <= 1.0 and 0.0 <= last["hidden_half_2"] <= 1.0
    # A checkpoint: captured on the critical path, gathered from the roles and
    # written in the background (the gathering is part of the write).
    assert data["checkpoint_capture_s"] > 0 and data["checkpoint_write_s"] > 0
    assert 0 < data["checkpoint_collect_s"] <= data["checkpoint_write_s"]
    assert data["checkpoint_gathered_at_once_s"] > 0 and data["checkpoint_bytes"] > 0
    inp = data["projection_inputs"]
    # Per core: the workers' own CPU seconds (no faster than a worker's wall-clock rate).
    assert inp["env_steps_per_s_per_core"] >= 0.5 * inp["env_steps_per_s_per_worker_wall"] > 0
    # theta is evaluated with its branches: the ES samples alone in the first half.
    assert (inp["half_1"], inp["half_2"], inp["per_iteration"]) == (6, 8, 14)
    assert inp["iterations"] == -(-1_000_000 // 14)  # the preset's 1M evaluations
    p10, p100 = data["projection"]
    assert p10["rollout_cpus"] == 10 and p100["rollout_cpus"] == 100
    assert p100["hours"] <= p10["hours"]
    # The formula, recomputed from its printed inputs.
    t_ep = inp["t_ep"]
    halves = t_ep + inp["t_jac"] + t_ep
    per = (halves + max(0.0, inp["t_train"] - halves) + inp["t_coord"]
           + inp["t_ckpt_per_iteration"]
           + (-(-inp["robustness_episodes"] // 10)) * t_ep * (inp["robustness_episodes"] > 0))
    assert p10["iteration_s"] == pytest.approx(per)
    printed = capsys.readouterr().out
    assert "projection: T = I *" in printed and "published: 16.3 h" in printed


def test_bench_coordinator_times_the_coordinator_alone_and_profiles_it(tmp_path, capsys):
    out = tmp_path / "coordinator.json"
    assert main(["bench", "coordinator", "--iterations", "3", "--rollout-s", "0.01",
                 "--profile", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["solution_dim"] == 21256 and data["elites"] > 0  # QD Ant, paper settings
    assert len(data["wall_ms_all"]) == 3 and data["wall_ms"] > 0 and data["cpu_ms"] > 0
    printed = capsys.readouterr().out
    assert "the coordinator's own work per iteration" in printed
    assert "coordinator.py" in printed and "cumulative" in printed  # the profile
