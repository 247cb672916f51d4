"""Metric sinks: progress bar, metrics.jsonl, wandb (offline without a key).

The run directory's durable files and lock live in :mod:`dqd_ray.state.rundir`
(re-exported here for older imports).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dqd_ray.state.rundir import (  # noqa: F401 - re-exported
    MetricsFileError,
    RunDirInUse,
    RunLock,
    append_durably,
    atomic_write_text,
    fsync_dir,
    parse_jsonl,
    read_jsonl,
    torn_warning,
)


def _clean(v: Any):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class Sink:
    """A metric sink: ``log(metrics, archive=None, checkpoint=None)`` once per
    iteration (``checkpoint``: the directory saved at this iteration, if any,
    complete on disk: the loop waits for its background write before calling a
    sink that uses it), ``close()`` at the end. ``wants_archive`` says when
    ``log`` should get the archive. A sink that ignores ``checkpoint`` says so
    (``uses_checkpoint = False``) and is not kept waiting for the write; any
    other sink (Tune's report, a sink without the attribute) is."""

    def wants_archive(self, iteration: int) -> bool:
        return False


class JsonlSink(Sink):
    """``metrics.jsonl``: each line is flushed and fsynced as it is written,
    before the loop writes that iteration's checkpoint (:attr:`before_checkpoint`),
    so that no checkpoint is ever ahead of the metrics."""

    before_checkpoint = True

    def __init__(self, path: Path):
        self.path = Path(path)
        new = not self.path.exists()
        self.f = open(path, "a", buffering=1)
        if new:
            fsync_dir(self.path.parent)

    def log(self, metrics: dict, archive=None, checkpoint=None) -> None:
        self.f.write(json.dumps(_clean(metrics)) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


class ProgressSink(Sink):
    uses_checkpoint = False

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="it",
                        dynamic_ncols=True)

    def log(self, metrics: dict, archive=None, checkpoint=None) -> None:
        best = metrics.get("best_fitness")
        self.bar.set_postfix(qd=f"{metrics['qd_score']:.0f}",
                             cov=f"{100 * metrics['coverage']:.1f}%",
                             best="-" if best is None else f"{best:.1f}",
                             sps=f"{metrics.get('env_steps_per_s', 0):.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def wandb_mode() -> str:
    """``online`` only with an API key (or an explicit WANDB_MODE); never prompts."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def scalars(metrics: dict) -> dict:
    """The finite int/float entries of ``metrics`` (what dashboards and Tune take)."""
    return {k: v for k, v in _clean(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink(Sink):
    """One wandb run per experiment; heatmaps every ``heatmap_every`` iterations.

    Args:
        run_dir: The wandb files go to ``run_dir/wandb``.
        cfg: The run's config (logged as the wandb config).
        run_id: The wandb run id (a resumed run continues the same wandb run).
        dims, names: Archive shape and measure names, for the heatmap.
        resume: Continue an existing wandb run of that id if there is one.
        name, group: Display name (default: the run directory's name) and
            group (default: ``logging.wandb_group``); a Tune trial passes its
            trial name and its sweep's name.
        extra_config: Merged into the logged config (a trial's sampled values).
    """

    uses_checkpoint = False

    def __init__(self, run_dir: Path, cfg, run_id: str, dims, names, resume: bool = False,
                 ranges=None,
                 name: str | None = None, group: str | None = None,
                 extra_config: dict | None = None):
        import wandb

        self.wandb = wandb
        self.dims, self.names, self.every = dims, names, cfg.logging.heatmap_every
        self.ranges = ranges if ranges is not None else cfg.env.resolved_ranges()
        config = cfg.model_dump(mode="json")
        if extra_config:
            config = {**config, **extra_config}
        self.run = wandb.init(
            project=cfg.logging.wandb_project, group=group or cfg.logging.wandb_group,
            config=config, dir=str(run_dir), id=run_id,
            name=name or run_dir.name, mode=wandb_mode(), resume="allow" if resume else None,
            # Written to the run's .wandb file every 0.25 s, not every 15 s: a
            # Tune trial stopped early (ASHA, PBT) may end before its wandb
            # run finishes, and keeps what was flushed (a tiny trial may be
            # stopped well within a second of its first log).
            settings=wandb.Settings(silent=True, console="off",
                                    finish_timeout=cfg.logging.wandb_finish_timeout_s,
                                    x_transaction_log_flush_interval=0.25),
        )
        self.run_dir = Path(self.run.dir).parent if self.run is not None else None

    def wants_archive(self, iteration: int) -> bool:
        return iteration % self.every == 0 or iteration == 1

    def log(self, metrics: dict, archive=None, checkpoint=None) -> None:
        data = scalars(metrics)
        it = int(metrics["iteration"])
        if archive is not None and self.wants_archive(it):
            from dqd_ray.analysis.viz import heatmap

            fig = heatmap(archive, self.dims, names=self.names, ranges=self.ranges,
                          title=f"iteration {it}")
            data["archive"] = self.wandb.Image(fig)
            import matplotlib.pyplot as plt

            plt.close(fig)
        self.run.log(data, step=it, commit=True)

    def log_media(self, media: dict, iteration: int) -> None:
        """The end-of-run heatmap and best-elite GIF.

        wandb ignores a step below its current one, and ``log`` has already
        committed the last iteration's step (its current step is one past
        it); a resumed run's current step is wherever that run stopped. The
        media go to the final iteration's step when it is still open (a
        resumed run that ran no iteration here), else to the first step
        wandb accepts, the one right after the last iteration's.
        """
        data = {}
        if "archive" in media:
            data["final_archive"] = self.wandb.Image(media["archive"])
        if "best_elite" in media:
            data["best_elite"] = self.wandb.Video(media["best_elite"], format="gif")
        if data:
            self.run.log(data, step=max(int(iteration), int(self.run.step)), commit=True)

    def close(self) -> None:
        self.run.finish()
