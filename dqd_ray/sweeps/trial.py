"""One trial: the trainable (one whole run) and the
sink that reports to Tune."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from dqd_ray.sweeps.file import ASHAScheduler, PBTScheduler, Sweep

# -- the trainable -------------------------------------------------------------------


class TuneReportSink:
    """Reports each iteration's scalars to Tune, with the checkpoint saved at
    that iteration (the run's own format, copied into Tune's storage); the
    local copy is then removed, Tune's copy being the one restores use. The
    loop calls it with a checkpoint only once its background write is complete
    (:attr:`uses_checkpoint`): Tune copies the directory as it is."""

    uses_checkpoint = True

    def __init__(self, max_report_keys: int | None = None):
        self.max_report_keys = max_report_keys

    def wants_archive(self, iteration: int) -> bool:
        return False

    def log(self, metrics: dict, archive=None, checkpoint=None) -> None:
        from ray import tune

        from dqd_ray.logging import scalars

        data = scalars(metrics)
        if checkpoint is None:
            tune.report(data)
            return
        tune.report(data, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)))
        shutil.rmtree(checkpoint, ignore_errors=True)

    def close(self) -> None:
        pass


def run_trial(config: dict, *, sweep_parts: tuple, wandb_mode: str | None = None) -> None:
    """The function trainable: one trial is one whole dqd-ray run.

    Builds the trial's config from the sweep (``config`` holds the sampled
    values), then starts fresh or restores from ``ray.tune.get_checkpoint()``
    (a retry, ``Tuner.restore`` or a PBT exploit), and runs the shared loop
    in ``<trial dir>/run``. ``wandb_mode``: the ``WANDB_MODE`` the user set
    where the sweep started, if any; without it the trial's own node decides
    (online only with a ``WANDB_API_KEY`` in that node's environment).
    """
    from ray import tune

    from dqd_ray.loop import Experiment

    if wandb_mode:
        os.environ["WANDB_MODE"] = wandb_mode
    sweep = Sweep.from_parts(*sweep_parts)
    cfg = sweep.trial_config(config)
    if cfg.logging.progress_bar:  # Tune prints its own table; bars would interleave with it
        cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(
            update={"progress_bar": False})})
    ctx = tune.get_context()
    run_dir = Path(ctx.get_trial_dir()) / "run"
    wandb_run = {"id": ctx.get_trial_id(), "name": ctx.get_trial_name(), "group": sweep.name,
                 "resume": True, "extra_config": {"tune/" + k: v for k, v in config.items()}}
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        if run_dir.exists():  # a retry that failed before its first checkpoint: keep it aside
            run_dir.rename(run_dir.with_name(f"run.failed-{time.strftime('%Y%m%d-%H%M%S')}"))
        exp = Experiment.create(cfg, run_dir, backend="ray", wandb_run=wandb_run)
    else:
        with checkpoint.as_directory() as d:
            exp = Experiment.restore(cfg, run_dir, d, backend="ray", wandb_run=wandb_run)
    exp.run(sinks=[TuneReportSink()])


def make_trainable(sweep: Sweep, wandb_mode: str | None = None):
    from ray import tune

    def resources(config: dict):
        return tune.PlacementGroupFactory(sweep.bundles(sweep.trial_config(config)))

    fn = tune.with_parameters(run_trial, sweep_parts=sweep.parts(), wandb_mode=wandb_mode)
    return tune.with_resources(fn, resources)


def make_scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler as Asha
    from ray.tune.schedulers import FIFOScheduler as Fifo
    from ray.tune.schedulers import PopulationBasedTraining

    s = sweep.spec.tune_config.scheduler
    if isinstance(s, ASHAScheduler):
        max_t = s.max_t or min(c.iterations for c in sweep.base_configs.values())
        return Asha(time_attr="training_iteration", max_t=max_t, grace_period=s.grace_period,
                    reduction_factor=s.reduction_factor, brackets=s.brackets)
    if isinstance(s, PBTScheduler):
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
            burn_in_period=s.burn_in_period,
            hyperparam_mutations={p.path: list(p.args) if p.kind == "choice" else p.to_tune()
                                  for p in sweep.mutations},
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
            synch=s.synch)
    return Fifo()


def wandb_env() -> dict[str, str]:
    """What the trials are told about wandb: ``WANDB_MODE`` when the user set
    it here, else nothing (each trial's node then decides: online only with a
    key in its own environment, see :func:`dqd_ray.logging.wandb_mode`).

    Never ``WANDB_API_KEY`` or any other secret: what goes in a job's
    ``runtime_env`` is logged by Ray and kept in its job table. Nodes read
    the key from their own environment (``cluster/*.yaml``,
    docs/security.md); a local Ray started here inherits this process's.
    """
    mode = os.environ.get("WANDB_MODE")
    return {"WANDB_MODE": mode} if mode else {}


def sweep_runtime_env() -> dict:
    """The ``runtime_env`` of the sweep's Ray job (see :func:`wandb_env`)."""
    return {"env_vars": wandb_env()}


