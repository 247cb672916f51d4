"""`dqd-ray bench quality` on a tiny budget, on the session's real local Ray."""

from __future__ import annotations

import json
import statistics

import pytest
from PIL import Image

from dqd_ray.cli import main

pytestmark = pytest.mark.slow


def test_bench_quality_runs_every_preset_on_one_budget_and_writes_its_table(ray_session,
                                                                            tmp_path, capsys):
    out = tmp_path / "q"
    args = ["bench", "quality", "--env", "QDHalfCheetahBulletEnv-v0",
            "--presets", "map_elites", "--evaluations", "24", "--seeds", "0", "1",
            "--robustness-episodes", "2", "--out", str(out), "--json", str(tmp_path / "q.json"),
            "--set", "env.episode_length=40", "--set", "checkpoint.every=100",
            "--set", "resources.num_rollout_workers=1",
            "--set", "map_elites:algorithm.batch_size=7"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "q.json").read_text())
    runs = data["runs"]
    assert [(r["preset"], r["seed"]) for r in runs] == [("map_elites", 0), ("map_elites", 1)]
    for r in runs:
        # Stopped at the first iteration that reaches the budget: 4 x 7 = 28 >= 24.
        assert r["evaluations"] == 28 and r["iterations"] == 4, r
        assert r["qd_score"] > 0 and r["mean_robustness"] is not None
        assert (tmp_path / "q" / r["run_dir"].split("/")[-1] / "config.yaml").exists()
    for entry in data["table"]:
        rs = [r for r in runs if r["preset"] == entry["preset"]]
        assert entry["seeds"] == 2
        for key in ("qd_score", "coverage", "best_fitness", "mean_robustness"):
            vals = [r[key] for r in rs]
            assert entry[key]["mean"] == pytest.approx(statistics.fmean(vals))
            assert entry[key]["std"] == pytest.approx(statistics.stdev(vals))
            assert (entry[key]["min"], entry[key]["max"]) == (min(vals), max(vals))
    md = (out / "quality.md").read_text()
    assert md.count("\n") == 3 and "| QDHalfCheetah | map_elites | 2 |" in md
    assert "mean ± std over seeds [0, 1]" in printed
    for tag in ("evaluations", "wall_time"):
        with Image.open(out / f"quality_QDHalfCheetah_{tag}.png") as im:
            assert im.size == (1500, 400)
    # One archive picture per family: map_elites's better seed of the two.
    best = max(runs, key=lambda r: r["qd_score"])
    assert runs[0]["family"] == "map_elites"
    assert f"({best['preset']} seed {best['seed']})" in printed
    assert data["plots"][-1].endswith("archive_QDHalfCheetah_map_elites.png")
    with Image.open(out / "archive_QDHalfCheetah_map_elites.png") as im:
        assert im.size[0] > 300
    assert data["paper_qd_ant_1m_x1e6_read_from_plot"]["me_es"] == 0.54


def test_bench_quality_refuses_bad_settings_before_any_run(tmp_path, capsys):
    base = ["bench", "quality", "--presets", "map_elites", "--evaluations", "10",
            "--out", str(tmp_path)]
    assert main([*base, "--set", "pga_me:algorithm.iso_sigma=0.1"]) == 2
    assert "pga_me is not one of the presets" in capsys.readouterr().err
    assert main([*base, "--set", "algorithm.iso_sigma=0.1"]) == 2  # not a map_elites field
    assert "not a setting of algorithm map_elites" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started
