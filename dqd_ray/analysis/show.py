"""``dqd-ray show`` and ``dqd-ray robustness``: what a researcher looks at after a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from dqd_ray.analysis import viz
from dqd_ray.analysis.results import Run, format_table, load_run, robustness, summary_row
from dqd_ray.envs import env_metadata


def _default_out(run_dirs: list[str]) -> Path:
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "show"
    return Path("runs") / time.strftime("show_%Y%m%d-%H%M%S")


def archive_png(run: Run, path: Path, vmin=None, vmax=None) -> Path:
    """The run's newest archive as a heatmap (pyribs' for 1-D and 2-D, slices for 4-D)."""
    import matplotlib.pyplot as plt

    meta = env_metadata(run.cfg.env.id)
    it = run.checkpoint.name if run.checkpoint is not None else ""
    fig = viz.heatmap(run.archive, run.cfg.env.resolved_dims(), path=path,
                      names=meta.measure_names, ranges=run.cfg.env.resolved_ranges(),
                      vmin=vmin, vmax=vmax,
                      title=f"{run.label}, {run.cfg.env.id}: {len(run.archive['objective'])} "
                      f"elites ({it})")
    plt.close(fig)
    return path


def run(run_dirs: list[str], out: str | None = None) -> dict:
    """Prints the summary table and writes the heatmaps, curves and tables to ``out``."""
    out_dir = Path(out) if out else _default_out(run_dirs)
    runs = [load_run(d, need_archive=False) for d in run_dirs]  # refuses before writing
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [summary_row(r) for r in runs]
    table = format_table(rows)
    print(table)
    files = []
    names = [Path(r.path).name or f"run{i}" for i, r in enumerate(runs)]
    if len(set(names)) < len(names):
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    for r, name in zip(runs, names):
        if r.archive is None:
            print(f"{r.path}: no checkpoint yet, so no heatmap")
            continue
        files.append(archive_png(r, out_dir / f"{name}_archive.png"))
    curve_runs = [{"label": r.label, "group": r.group, "metrics": r.metrics} for r in runs]
    for x, tag in (("evaluations", "evaluations"), ("wall_s", "wall_time")):
        path = out_dir / f"curves_{tag}.png"
        viz.curves(curve_runs, x, path)
        files.append(path)
    (out_dir / "summary.md").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    for f in files:
        print(f"wrote {f}")
    return {"rows": rows, "files": [str(f) for f in files], "out": str(out_dir)}


def robustness_command(run_dir: str, episodes: int = 10, out: str | None = None,
                       own_seeds: bool = False, seed: int = 12345,
                       local_inprocess: bool = False, address: str | None = None,
                       num_cpus: int | None = None) -> dict:
    """Re-evaluates every elite of a run's newest archive; writes JSON and a histogram."""
    from dqd_ray.runtime import EvaluationPool

    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    r = load_run(run_dir)
    if local_inprocess:
        pool = EvaluationPool(r.cfg, "inprocess")
    else:
        from dqd_ray.loop import init_ray

        init_ray(address, num_cpus)
        pool = EvaluationPool(r.cfg, "ray")
    try:
        res = robustness(pool, r.archive, episodes=episodes, seed=seed, own_seeds=own_seeds)
    finally:
        pool.close()
    out_dir = Path(out) if out else r.path
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "robustness_own_seeds" if own_seeds else "robustness"
    viz.histogram(res["per_elite"], out_dir / f"{stem}.png",
                  xlabel="re-evaluated mean fitness - archived fitness",
                  title=f"{r.label}: mean elite robustness {res['mean_robustness']:.2f} "
                  f"({res['elites']} elites x {res['episodes']} episodes)")
    record = {k: v for k, v in res.items() if k != "per_elite"}
    record.update(run=str(r.path), checkpoint=str(r.checkpoint), workers=len(pool.workers),
                  per_elite=np.asarray(res["per_elite"]).tolist())
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
    print(f"{r.label}: mean elite robustness {res['mean_robustness']:.3f} "
          f"(median {res['median_robustness']:.3f}) over {res['elites']} elites x "
          f"{res['episodes']} episodes on {len(pool.workers)} workers, "
          f"{res['evaluate_s']:.1f} s")
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.png')}")
    return record
