"""Reading finished (or running) runs: summaries, elites, GIFs and robustness.

Everything here reads a run directory as the loop writes it (``config.yaml``,
``metrics.jsonl``, ``summary.json``, ``checkpoints/``) and only ever loads
YAML, JSON and numeric arrays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dqd_ray.config import ConfigError, ExperimentConfig, build_config
from dqd_ray.envs import make_env
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.state import checkpoint as ckpt
from dqd_ray.state.rundir import read_jsonl

SUMMARY_COLUMNS = (
    ("qd_score", "QD score", "{:.1f}"), ("norm_qd_score", "norm. QD score", "{:.4f}"),
    ("coverage", "coverage", "{:.2%}"), ("best_fitness", "best fitness", "{:.2f}"),
    ("evaluations", "evaluations", "{:d}"), ("env_steps", "env steps", "{:d}"),
    ("wall_s", "wall time (s)", "{:.0f}"),
)


@dataclass
class Run:
    """A run directory, read."""

    path: Path
    cfg: ExperimentConfig
    metrics: list[dict]
    final: dict
    archive: dict | None = None
    checkpoint: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.cfg.preset or self.cfg.algorithm.name} seed {self.cfg.seed}"

    @property
    def group(self) -> str:
        return f"{self.cfg.preset or self.cfg.algorithm.name} {self.cfg.env.id}"


def load_run(run_dir: str | Path, need_archive: bool = True) -> Run:
    """Reads a run directory.

    Raises:
        ConfigError: Not a run directory, or a corrupt metrics line that is not
            the last (:class:`~dqd_ray.state.rundir.MetricsFileError`).
        CheckpointError: ``need_archive`` and no intact checkpoint.
    """
    path = Path(run_dir)
    cfg_path = path / "config.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"{path} is not a run directory (no config.yaml); give the directory "
                          "`dqd-ray run` printed")
    cfg = build_config(file=cfg_path)
    metrics_path = path / "metrics.jsonl"
    # A torn last line (a crash while it was written) is dropped with a warning.
    metrics = read_jsonl(metrics_path) if metrics_path.exists() else []
    final = dict(metrics[-1]) if metrics else {}
    run = Run(path=path, cfg=cfg, metrics=metrics, final=final)
    found = ckpt.latest_valid(path / "checkpoints")
    if found is not None:
        run.checkpoint = found[0]
        with np.load(found[0] / "archive.npz", allow_pickle=False) as z:
            run.archive = {k: z[k] for k in z.files}
    elif need_archive:
        raise ckpt.CheckpointError(f"{path}: no intact checkpoint holds an archive yet "
                                   f"(checkpoints every {cfg.checkpoint.every} iterations)")
    return run


def summary_row(run: Run) -> dict:
    """The summary table's values of a run (None where a run lacks one)."""
    f = run.final
    row = {key: f.get(key) for key, _, _ in SUMMARY_COLUMNS}
    row.update(run=str(run.path), preset=run.cfg.preset or run.cfg.algorithm.name,
               env=run.cfg.env.id, seed=run.cfg.seed, iteration=f.get("iteration"))
    return row


def format_table(rows: list[dict], first=("run", "preset", "seed")) -> str:
    """A Markdown table of summary rows."""
    head = list(first) + [name for _, name, _ in SUMMARY_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(k, "")) for k in first]
        for key, _, fmt in SUMMARY_COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else fmt.format(int(v) if "d" in fmt else v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- elites -------------------------------------------------------------------------


def choose_elite(archive: dict, which: str = "best", measures: list[float] | None = None,
                 seed: int = 0) -> int:
    """Row of the elite: ``best``, ``random``, a row index, or the cell of ``measures``."""
    n = len(archive["objective"])
    if n == 0:
        raise ValueError("the archive is empty: there is no elite to choose")
    if measures is not None:
        m = np.asarray(measures, np.float64)
        if m.shape != (archive["measures"].shape[1],):
            raise ValueError(f"--measures needs {archive['measures'].shape[1]} values, got "
                             f"{len(m)}")
        return int(np.argmin(((archive["measures"] - m) ** 2).sum(axis=1)))
    if which == "best":
        return int(np.argmax(archive["objective"]))
    if which == "random":
        return int(np.random.default_rng(seed).integers(n))
    try:
        i = int(which)
    except ValueError:
        raise ValueError(f"--elite must be best, random or a row index, got {which!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--elite {i}: the archive has elites 0..{n - 1}")
    return i


def render_episode(cfg: ExperimentConfig, genome: np.ndarray, seed: int,
                   steps: int | None = None, frame_every: int = 2, size=(320, 240)):
    """Runs one episode of ``genome`` headless and returns ``(frames, fitness, measures)``.

    The actions are the rollout worker's (same forward, same env), so with the
    elite's archived seed and the full episode length the fitness and
    measures are the archived ones.
    """
    spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
    genome = np.asarray(spec.check(genome), np.float32)
    length = cfg.env.episode_length if steps is None else int(steps)
    env = make_env(cfg.env.id, max_episode_steps=length, render_mode="rgb_array",
                   render_width=size[0], render_height=size[1])
    try:
        obs, _ = env.reset(seed=int(seed))
        frames = [env.render()]
        done, t = False, 0
        while not done:
            action = spec.forward_many_np(genome[None], np.asarray(obs, np.float32)[None])[0]
            obs, _, term, trunc, _ = env.step(action.astype(np.float64))
            done = term or trunc
            t += 1
            if t % frame_every == 0 or done:
                frames.append(env.render())
        return frames, float(env.episode_return), np.asarray(env.measures(), np.float64)
    finally:
        env.close()


def write_gif(frames: list[np.ndarray], path: str | Path, fps: int = 30) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, frames, format="GIF", duration=1000.0 / fps, loop=0)
    return path


def render_elite(run_dir: str | Path, elite: str = "best", measures=None, out=None,
                 steps: int | None = None, seed: int | None = None, frame_every: int = 2) -> dict:
    """Renders an elite of a run's newest checkpoint to a GIF; returns what it found."""
    run = load_run(run_dir)
    i = choose_elite(run.archive, elite, measures)
    a = run.archive
    episode_seed = int(a["seed"][i]) if seed is None and "seed" in a else int(seed or 0)
    t0 = time.perf_counter()
    frames, fitness, meas = render_episode(run.cfg, a["solution"][i], episode_seed, steps,
                                           frame_every)
    path = Path(out) if out else run.path / f"elite_{i}.gif"
    write_gif(frames, path)
    return {"row": i, "index": int(a["index"][i]), "gif": str(path), "frames": len(frames),
            "seed": episode_seed, "archived_fitness": float(a["objective"][i]),
            "archived_measures": a["measures"][i].tolist(), "fitness": fitness,
            "measures": meas.tolist(), "render_s": time.perf_counter() - t0}


# -- robustness ---------------------------------------------------------------------


def robustness(evaluator, archive: dict, episodes: int = 10, seed: int = 12345,
               own_seeds: bool = False) -> dict:
    """The paper's mean elite robustness of an archive.

    Every elite is re-evaluated ``episodes`` times with new env seeds (or once
    with its archived seed, ``own_seeds``); its robustness is the mean of the
    re-evaluations minus its archived fitness.

    Args:
        evaluator: ``evaluate(genomes, seeds, record=False) -> dict``.
    """
    sols = np.asarray(archive["solution"], np.float32)
    n = len(sols)
    if n == 0:
        raise ValueError("the archive is empty: nothing to re-evaluate")
    if own_seeds:
        if "seed" not in archive:
            raise ValueError("this archive keeps no evaluation seeds (made before they were "
                             "archived): re-evaluate with new seeds instead")
        episodes = 1
        seeds = np.asarray(archive["seed"], np.int64)
    else:
        seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=n * episodes)
    genomes = np.repeat(sols, episodes, axis=0)
    t0 = time.perf_counter()
    out = evaluator.evaluate(genomes, seeds, record=False)
    fit = np.where(out["valid"], out["fitness"], np.nan).reshape(n, episodes)
    per_elite = np.nanmean(fit, axis=1) - np.asarray(archive["objective"], np.float64)
    return {"mean_robustness": float(np.nanmean(per_elite)), "per_elite": per_elite,
            "median_robustness": float(np.nanmedian(per_elite)), "elites": n,
            "episodes": episodes, "invalid": int((~np.asarray(out["valid"])).sum()),
            "evaluate_s": time.perf_counter() - t0, "own_seeds": own_seeds}
