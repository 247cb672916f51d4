"""Hyperparameter sweeps with Ray Tune.

- ``file.py``: the sweep file (schema, samplers, validation) and :class:`Sweep`;
- ``trial.py``: one trial: the trainable (one whole run), its report sink, restores;
- ``launcher.py``: run, resume, dry run and the results table.

A trial's resource bundles are computed with the run's own
(:func:`dqd_ray.runtime.resources.trial_bundles`).
"""

from dqd_ray.runtime.resources import check_fits, describe_bundles, trial_bundles
from dqd_ray.sweeps.file import (
                                 PBT_MUTABLE,
                                 SAMPLERS,
                                 TUNE_METRICS,
                                 ASHAScheduler,
                                 FIFOScheduler,
                                 Param,
                                 PBTScheduler,
                                 Sweep,
                                 SweepFile,
                                 parse_param,
                                 reported,
)
from dqd_ray.sweeps.launcher import (
                                 check_experiment_dir_private,
                                 dry_run_report,
                                 run_sweep,
                                 write_csv,
)
from dqd_ray.sweeps.trial import (
                                 TuneReportSink,
                                 make_scheduler,
                                 make_trainable,
                                 run_trial,
                                 sweep_runtime_env,
                                 wandb_env,
)

__all__ = ["PBT_MUTABLE", "SAMPLERS", "TUNE_METRICS", "ASHAScheduler", "FIFOScheduler",
           "PBTScheduler", "Param", "Sweep", "SweepFile", "TuneReportSink",
           "check_experiment_dir_private", "check_fits", "describe_bundles", "dry_run_report",
           "make_scheduler", "make_trainable", "parse_param", "reported", "run_sweep",
           "run_trial", "sweep_runtime_env", "trial_bundles", "wandb_env", "write_csv"]
