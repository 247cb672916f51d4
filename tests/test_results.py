"""Results you can see: `show`, `render`, `robustness`, the end-of-run heatmap and
GIF, on tiny real runs (pybullet physics, pyribs archives)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dqd_ray.analysis.results import load_run, render_episode
from dqd_ray.cli import main

ENVS = {"ant": "QDAntBulletEnv-v0", "cheetah": "QDHalfCheetahBulletEnv-v0",
        "hopper": "QDHopperBulletEnv-v0"}
TINY = ["algorithm.batch_size=12", "env.episode_length=60", "metrics.robustness_every=0",
        "checkpoint.every=1", "logging.progress_bar=false", "logging.gif_frame_every=3"]


def _run(out: Path, env_id: str, seed: int = 0, iterations: int = 2) -> Path:
    args = ["run", "--preset", "map_elites", "--local-inprocess", "--out", str(out)]
    for s in [*TINY, f"env.id={env_id}", f"seed={seed}", f"iterations={iterations}"]:
        args += ["--set", s]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {name: _run(root / name, env_id) for name, env_id in ENVS.items()}
    out["ant_seed1"] = _run(root / "ant_seed1", ENVS["ant"], seed=1, iterations=3)
    return out


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        return im.size


def test_end_of_run_heatmap_and_best_elite_gif(runs):
    run = runs["ant"]
    assert _png_size(run / "archive.png") == (850, 800)  # 4-D: 6x6 slices of 6x6
    summary = json.loads((run / "summary.json").read_text())
    replay = summary["media"]["best_elite_fitness"]
    # Replayed with its archived seed: the archived episode again.
    assert replay["replayed"] == pytest.approx(replay["archived"], rel=1e-6)
    with Image.open(run / "best_elite.gif") as im:
        assert im.format == "GIF" and im.size == (320, 240) and im.n_frames > 5


def test_show_writes_the_table_heatmaps_and_curves(runs, tmp_path, capsys):
    dirs = [runs["ant"], runs["ant_seed1"], runs["cheetah"], runs["hopper"]]
    assert main(["show", *map(str, dirs), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| QD score | norm. QD score | coverage | best fitness | evaluations |" in printed
    rows = json.loads((tmp_path / "summary.json").read_text())
    for row, d in zip(rows, dirs):
        final = load_run(d).final
        assert row["qd_score"] == final["qd_score"] and row["evaluations"] == final["evaluations"]
        assert row["env_steps"] == final["env_steps"] and row["wall_s"] == final["wall_s"]
    assert rows[1]["evaluations"] == 36 and rows[0]["evaluations"] == 24
    assert _png_size(tmp_path / "ant_archive.png") == (850, 800)
    assert _png_size(tmp_path / "cheetah_archive.png") == (650, 500)  # pyribs' 2-D heatmap
    assert _png_size(tmp_path / "hopper_archive.png") == (650, 240)  # pyribs' 1-D heatmap
    for tag in ("evaluations", "wall_time"):
        assert _png_size(tmp_path / f"curves_{tag}.png") == (1500, 400)
    assert (tmp_path / "summary.md").read_text().count("\n") == 2 + len(dirs)


def test_the_4d_heatmap_shares_one_colour_scale_and_labels_each_measure(runs):
    import matplotlib.pyplot as plt

    from dqd_ray.analysis import viz
    from dqd_ray.envs import env_metadata

    run = load_run(runs["ant"])
    names = env_metadata(ENVS["ant"]).measure_names
    fig = viz.heatmap(run.archive, [6, 6, 6, 6], names=names)
    (image,) = [im for ax in fig.axes for im in ax.get_images()]  # the 36 slices, one image
    assert image.get_clim() == (float(run.archive["objective"].min()),
                                float(run.archive["objective"].max()))
    text = " ".join(t.get_text() for t in fig.texts)
    for name in names:
        assert name.replace("_", " ") + " contact" in text
    # Every elite is drawn in its slice and cell, with a blank line between slices.
    drawn = np.ma.filled(image.get_array(), np.nan)
    assert drawn.shape == (6 * 7 - 1, 6 * 7 - 1)
    assert np.isfinite(drawn).sum() == len(run.archive["objective"])
    assert np.isnan(drawn[6]).all() and np.isnan(drawn[:, 6]).all()
    grid = viz.archive_grid(run.archive["index"], run.archive["objective"], [6, 6, 6, 6])
    best = np.unravel_index(np.nanargmax(grid), grid.shape)
    # measure 0 across, measure 1 up; within a slice measure 2 across, measure 3 up
    assert drawn[best[1] * 7 + best[3], best[0] * 7 + best[2]] == np.nanmax(grid)
    plt.close(fig)


def test_render_twice_gives_identical_frames_and_the_archived_episode(runs, tmp_path, capsys):
    run = load_run(runs["cheetah"])
    i = int(np.argmax(run.archive["objective"]))
    seed = int(run.archive["seed"][i])
    a = render_episode(run.cfg, run.archive["solution"][i], seed, frame_every=5)
    b = render_episode(run.cfg, run.archive["solution"][i], seed, frame_every=5)
    assert len(a[0]) == len(b[0]) > 5
    for fa, fb in zip(a[0], b[0]):
        assert fa.shape == (240, 320, 3)
        np.testing.assert_array_equal(fa, fb)
    assert len({f.tobytes() for f in a[0]}) > 1  # the robot moves
    assert a[1] == pytest.approx(float(run.archive["objective"][i]), rel=1e-6)
    np.testing.assert_allclose(a[2], run.archive["measures"][i], atol=1e-6)

    gif = tmp_path / "e.gif"
    assert main(["render", str(runs["cheetah"]), "--elite", "random", "--out", str(gif),
                 "--steps", "30", "--frame-every", "3"]) == 0
    out = capsys.readouterr().out
    assert "archived:" in out and "re-evaluated:" in out
    with Image.open(gif) as im:
        assert im.size == (320, 240) and im.n_frames == 11  # the first, then every 3rd
    assert main(["render", str(runs["cheetah"]), "--measures", "0.5,0.5",
                 "--out", str(gif)]) == 0
    assert main(["render", str(runs["cheetah"]), "--measures", "0.5"]) == 2
    assert "needs 2 values" in capsys.readouterr().err
    assert main(["render", str(runs["cheetah"]), "--elite", "9999"]) == 2
    # Bad arguments on a real run: refused before the episode (more in test_cli.py).
    zero = tmp_path / "zero.gif"
    assert main(["render", str(runs["cheetah"]), "--frame-every", "0", "--out", str(zero)]) == 2
    assert "--frame-every must be at least 1, got 0" in capsys.readouterr().err
    assert main(["render", str(runs["cheetah"]), "--steps", "0", "--out", str(zero)]) == 2
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
    assert not zero.exists()


def test_robustness_with_the_archives_own_seeds_is_zero(runs, capsys):
    assert main(["robustness", str(runs["hopper"]), "--own-seeds", "--local-inprocess"]) == 0
    rec = json.loads((runs["hopper"] / "robustness_own_seeds.json").read_text())
    elites = len(load_run(runs["hopper"]).archive["objective"])
    assert rec["elites"] == elites == len(rec["per_elite"]) and rec["episodes"] == 1
    assert abs(rec["mean_robustness"]) < 1e-4  # float32 archive objectives
    assert max(abs(v) for v in rec["per_elite"]) < 1e-3
    assert _png_size(runs["hopper"] / "robustness_own_seeds.png") == (600, 400)


@pytest.mark.slow
def test_robustness_on_ray_uses_every_worker_and_new_seeds(runs, ray_session, capsys):
    run = runs["ant"]
    assert main(["robustness", str(run), "--episodes", "3"]) == 0
    rec = json.loads((run / "robustness.json").read_text())
    n = len(load_run(run).archive["objective"])
    assert rec["elites"] == n and rec["episodes"] == 3 and rec["workers"] >= 2
    per = np.array(rec["per_elite"])
    assert per.shape == (n,) and np.isfinite(per).all()
    assert rec["mean_robustness"] == pytest.approx(per.mean())
    assert np.abs(per).max() > 1e-3  # new seeds: other episodes
    assert _png_size(run / "robustness.png") == (600, 400)


def test_show_and_render_refuse_what_is_not_a_run(tmp_path, capsys):
    assert main(["render", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    # On Ray by default, but the directory is read first: refused before Ray starts.
    assert main(["robustness", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["robustness", str(tmp_path), "--episodes", "0"]) == 2
    assert "--episodes must be at least 1, got 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert main(["show", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # show refuses before creating its output folder
