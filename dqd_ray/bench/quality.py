"""``dqd-ray bench quality``: algorithms compared at one evaluation budget.

Every preset runs on every env with every seed through the shared loop on one
local Ray (``dqd-ray run`` as a user starts it), until the same evaluation
budget is spent. Each final archive is then re-evaluated on all rollout
workers for the mean elite robustness. The table gives, per env and preset,
the mean and spread (sample std; min and max in the JSON) over seeds of the
QD score, the normalized QD score, the coverage, the best fitness and the
mean elite robustness; the plots are the curves of every run against
evaluations and against wall time.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

from dqd_ray.bench.common import machine_info, print_table, write_json

METRICS = ("qd_score", "norm_qd_score", "coverage", "best_fitness", "mean_robustness")

# QD Ant, 1M evaluations, QD score x 10^6 as read off the official comparison plot
# (Tjanaka et al. 2022); read from a plot, so about +-0.05.
PAPER_QD_ANT_1M = {"cma_mega_es": 1.65, "cma_mega_td3_es": 1.48, "pga_me": 1.67,
                   "me_es": 0.54, "map_elites": 1.42}


def _spread(values: list[float]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _fmt(s: dict, pct: bool = False) -> str:
    if s["mean"] is None:
        return "-"
    scale = 100.0 if pct else 1.0
    mean, std = s["mean"] * scale, s["std"] * scale
    digits = 4 if abs(mean) < 1 else (2 if abs(mean) < 100 else 0)
    unit = "%" if pct else ""
    return f"{mean:,.{digits}f}{unit} ± {std:,.{digits}f}" if s["n"] > 1 else \
        f"{mean:,.{digits}f}{unit}"


def curves_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curves of the runs (``run_dir``, ``preset``, ``seed``), read from
    their ``metrics.jsonl`` as ``show`` reads them (a torn last line, left by a
    crash, is dropped with a warning)."""
    from dqd_ray.analysis.results import load_run

    return [{"label": f"{r['preset']} seed {r['seed']}", "group": r["preset"],
             "metrics": load_run(r["run_dir"], need_archive=False).metrics} for r in runs]


def archive_pictures(runs: list[dict[str, Any]], root: Path) -> list[str]:
    """One archive heatmap per env and algorithm family: the family's run with
    the highest QD score, all of an env's pictures on one colour scale (from the
    lowest to the highest elite fitness among the runs drawn)."""
    from dqd_ray.analysis.results import load_run
    from dqd_ray.analysis.show import archive_png

    written = []
    for env_id in dict.fromkeys(r["env"] for r in runs):
        best: dict[str, dict] = {}
        for r in runs:
            if r["env"] == env_id and r["qd_score"] is not None and (
                    r["family"] not in best or r["qd_score"] > best[r["family"]]["qd_score"]):
                best[r["family"]] = r
        loaded = {fam: load_run(r["run_dir"]) for fam, r in best.items()}
        loaded = {fam: run for fam, run in loaded.items() if len(run.archive["objective"])}
        if not loaded:
            continue
        vmin = min(float(run.archive["objective"].min()) for run in loaded.values())
        vmax = max(float(run.archive["objective"].max()) for run in loaded.values())
        tag = env_id.replace("BulletEnv-v0", "")
        for fam, run in loaded.items():
            path = root / f"archive_{tag}_{fam}.png"
            archive_png(run, path, vmin=vmin, vmax=vmax)
            written.append(str(path))
            print(f"wrote {path} ({best[fam]['preset']} seed {best[fam]['seed']})")
    return written


def run(env_ids: tuple[str, ...] = ("QDAntBulletEnv-v0",),
        presets: tuple[str, ...] | None = None,
        evaluations: int = 20000, seeds: tuple[int, ...] = (0, 1), sets: list[str] | None = None,
        out: str | None = None, json_path: str | None = None, robustness_episodes: int = 10,
        num_cpus: int | None = None) -> dict[str, Any]:
    from dqd_ray.analysis import viz
    from dqd_ray.analysis.results import load_run, robustness
    from dqd_ray.config import PAPER_PRESETS, ConfigError, build_config
    from dqd_ray.loop import Experiment, init_ray
    from dqd_ray.runtime import EvaluationPool, evaluations_per_iteration

    presets = tuple(presets or PAPER_PRESETS)
    if evaluations < 1:
        raise ConfigError(f"--evaluations must be >= 1, got {evaluations}")
    sets = list(sets or [])
    # PRESET:KEY=VALUE applies to that preset only (its algorithm's own fields).
    scoped = [s.split(":", 1) for s in sets if ":" in s.split("=", 1)[0]]
    unknown = sorted({p for p, _ in scoped} - set(presets))
    if unknown:
        raise ConfigError(f"--set {unknown[0]}:...: {unknown[0]} is not one of the presets "
                         f"{list(presets)}")
    common = [s for s in sets if ":" not in s.split("=", 1)[0]]
    # Every config is built (and so checked) before the first run starts.
    plan = []
    for env_id in env_ids:
        for preset in presets:
            own = [kv for p, kv in scoped if p == preset]
            for seed in seeds:
                base = [f"env.id={env_id}", f"seed={seed}", f"evaluations={evaluations}",
                        "logging.progress_bar=false", "logging.final_gif=false", *common, *own]
                cfg = build_config(preset, sets=base)
                per_it = evaluations_per_iteration(cfg)
                iterations = math.ceil(evaluations / per_it) + 1  # the budget binds first
                cfg = build_config(preset, sets=base + [f"iterations={iterations}"])
                plan.append((env_id, preset, seed, cfg))
    family = {preset: cfg.algorithm.name for _, preset, _, cfg in plan}
    root = Path(out) if out else Path("runs") / time.strftime("quality_%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    init_ray(num_cpus=num_cpus)
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for n, (env_id, preset, seed, cfg) in enumerate(plan, 1):
        run_dir = root / f"{env_id.replace('BulletEnv-v0', '')}_{preset}_s{seed}"
        print(f"[{n}/{len(plan)}] {preset} on {env_id}, seed {seed}: {evaluations} evaluations "
              f"-> {run_dir}", flush=True)
        t0 = time.perf_counter()
        summary = Experiment.create(cfg, run_dir, backend="ray").run()
        final = summary.get("final") or {}
        row = {"env": env_id, "preset": preset, "family": family[preset], "seed": seed,
               "run_dir": str(run_dir),
               "wall_s": time.perf_counter() - t0, "evaluations": final.get("evaluations"),
               "iterations": final.get("iteration"), "env_steps": final.get("env_steps"),
               **{k: final.get(k) for k in METRICS[:-1]}, "mean_robustness": None}
        if robustness_episodes > 0:
            archived = load_run(run_dir)
            if len(archived.archive["objective"]):
                pool = EvaluationPool(cfg, "ray")
                try:
                    res = robustness(pool, archived.archive, episodes=robustness_episodes,
                                     seed=10_000 + seed)
                finally:
                    pool.close()
                row["mean_robustness"] = res["mean_robustness"]
                row["robustness_s"] = res["evaluate_s"]
        print(f"    QD score {row['qd_score']:,.0f}  coverage {100 * row['coverage']:.2f}%  "
              f"best {row['best_fitness']:.1f}  robustness {row['mean_robustness']}  "
              f"({row['wall_s']:.0f} s)", flush=True)
        runs.append(row)
    table = []
    for env_id in env_ids:
        for preset in presets:
            rs = [r for r in runs if r["env"] == env_id and r["preset"] == preset]
            entry = {"env": env_id, "preset": preset, "seeds": len(rs),
                     **{k: _spread([r[k] for r in rs]) for k in METRICS},
                     "wall_s": _spread([r["wall_s"] for r in rs])}
            table.append(entry)
    shown = [{"env": t["env"].replace("BulletEnv-v0", ""), "preset": t["preset"],
              "seeds": t["seeds"], "QD score": _fmt(t["qd_score"]),
              "norm. QD score": _fmt(t["norm_qd_score"]), "coverage": _fmt(t["coverage"], True),
              "best fitness": _fmt(t["best_fitness"]),
              "robustness": _fmt(t["mean_robustness"]), "wall s": _fmt(t["wall_s"])}
             for t in table]
    print(f"\n{evaluations:,} evaluations per run; mean ± std over seeds {list(seeds)}")
    columns = ["env", "preset", "seeds", "QD score", "norm. QD score", "coverage",
               "best fitness", "robustness", "wall s"]
    print_table(shown, columns)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in shown]
    (root / "quality.md").write_text("\n".join(md) + "\n")
    plots = []
    for env_id in env_ids:
        tag = env_id.replace("BulletEnv-v0", "")
        curve_runs = curves_of([r for r in runs if r["env"] == env_id])
        for x, name in (("evaluations", "evaluations"), ("wall_s", "wall_time")):
            path = root / f"quality_{tag}_{name}.png"
            viz.curves(curve_runs, x, path)
            plots.append(str(path))
            print(f"wrote {path}")
    plots += archive_pictures(runs, root)
    payload = {"bench": "quality", "machine": machine_info(), "evaluations": evaluations,
               "seeds": list(seeds), "sets": sets, "robustness_episodes": robustness_episodes,
               "runs": runs, "table": table, "plots": plots, "out": str(root),
               "total_s": time.perf_counter() - t_all,
               "paper_qd_ant_1m_x1e6_read_from_plot": PAPER_QD_ANT_1M}
    write_json(json_path or root / "quality.json", payload)
    return payload
