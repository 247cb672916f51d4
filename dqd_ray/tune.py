"""Hyperparameter sweeps with Ray Tune; the code lives in :mod:`dqd_ray.sweeps`
(the sweep file, the trial, the launcher). This module keeps the names the
CLI, the tests and users' scripts import."""

from dqd_ray.sweeps.file import (  # noqa: F401
    PBT_MUTABLE, SAMPLERS, TUNE_METRICS, ASHAScheduler, FIFOScheduler, Param, PBTScheduler,
    Sweep, SweepFile, parse_param, reported)
from dqd_ray.sweeps.launcher import (  # noqa: F401
    check_experiment_dir_private, dry_run_report, run_sweep, write_csv)
from dqd_ray.runtime.resources import check_fits, describe_bundles, trial_bundles  # noqa: F401
from dqd_ray.sweeps.trial import (  # noqa: F401
    TuneReportSink, make_scheduler, make_trainable, run_trial, sweep_runtime_env, wandb_env)
