"""Hyperparameter sweeps with Ray Tune: sweep files, trial bundles, the trainable.

A sweep file (YAML, see ``tune_configs/``) names a base experiment config and
what to vary::

    name: quick_local                # experiment directory and wandb group
    storage_path: runs/tune          # where trial directories go
    base:                            # the experiment every trial starts from
      preset: cma_mega_td3           # and/or config: FILE (relative to this file)
      set: {iterations: 8, resources.num_rollout_workers: 1}
    param_space:                     # dotted config path -> sampler (or a constant)
      algorithm.sigma0: {grid_search: [0.1, 0.5]}
      td3.lr: {loguniform: [1.0e-4, 1.0e-3]}
    tune_config:
      metric: qd_score
      mode: max
      num_samples: 1
      scheduler: {name: asha, grace_period: 2, reduction_factor: 2}
      max_concurrent_trials: 2
      time_budget_s: 1800
    trial: {driver_cpus: 1, max_failures: 2}

``preset`` itself may be a parameter (a grid over algorithms). One trial is
one whole run: the trainable builds the system inside the trial with the
shared builder and runs the shared loop (:class:`dqd_ray.loop.Experiment`),
reporting scalar metrics every iteration and a checkpoint (the run's own
format) every ``checkpoint.every`` iterations. Its placement group holds one
bundle for the trial's driver (the loop; coordinator and replay ask for no
CPUs), one per rollout worker and one per learner, so two trials on one
machine never compete for the same CPUs.

Everything is checked before Ray starts: unknown keys, unknown samplers,
paths that are not config settings, every grid point and choice and the
bounds of every distribution against the config's own validation, the
metric, PBT's checkpoint cadence and mutable settings; after Ray starts,
that one trial fits the cluster.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dqd_ray.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    build_config,
    format_error,
    merge,
    nest_dotted,
    parse_set,
)

SAMPLERS = ("grid_search", "choice", "uniform", "loguniform", "randint", "quniform")
# Results Tune adds to every report; a sweep may optimize them too.
TUNE_METRICS = frozenset({"training_iteration", "time_total_s", "time_this_iter_s"})
# What PBT may change when one trial takes another's checkpoint: settings read
# from the config when the system is rebuilt, none of them held in the saved
# state (a mutated emitter learning rate, say, would be undone by the restore).
PBT_MUTABLE = frozenset({
    "td3.batch_size", "td3.gamma", "td3.tau", "td3.policy_delay", "td3.target_noise",
    "td3.noise_clip", "td3.lr", "td3.train_steps_per_iteration", "td3.jacobian_states",
    "td3.learning_starts", "es.sigma", "metrics.robustness_every",
    "metrics.robustness_episodes",
})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSection(_Strict):
    preset: str | None = Field(None, description="A preset (`dqd-ray config --preset`).")
    config: str | None = Field(None, description="A config YAML, relative to the sweep file.")
    set: dict[str, Any] = Field(default_factory=dict,
                                description="Overrides by dotted path, as with --set.")


class FIFOScheduler(_Strict):
    name: Literal["fifo"]


class ASHAScheduler(_Strict):
    name: Literal["asha"]
    grace_period: int = Field(1, gt=0, description="Iterations before a trial can be stopped.")
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int | None = Field(None, gt=0, description="Default: the base config's iterations.")
    brackets: int = Field(1, gt=0)


class PBTScheduler(_Strict):
    name: Literal["pbt"]
    perturbation_interval: int = Field(..., gt=0, description="Iterations between exploits.")
    hyperparam_mutations: dict[str, Any] = Field(..., min_length=1)
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    burn_in_period: int = Field(0, ge=0)
    synch: bool = False


class TuneSection(_Strict):
    metric: str = "qd_score"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, gt=0, description="Repeats of the grid (random samplers "
                             "draw anew each time).")
    scheduler: FIFOScheduler | ASHAScheduler | PBTScheduler = Field(
        default_factory=lambda: FIFOScheduler(name="fifo"), discriminator="name")
    max_concurrent_trials: int | None = Field(None, gt=0)
    time_budget_s: float | None = Field(None, gt=0)


class TrialSection(_Strict):
    driver_cpus: float = Field(1.0, ge=0, description="CPUs of each trial's driver bundle "
                               "(the loop; 0: the trial asks only for its actors' bundles).")
    max_failures: int = Field(2, ge=-1, description="Retries of a failed trial, each from "
                              "its last checkpoint (-1: no limit).")
    checkpoints_to_keep: int | None = Field(
        None, gt=0, description="Tune checkpoints kept per trial. Default: checkpoint.keep "
        "(at least 2); with PBT all of them, since an exploit may copy a checkpoint a faster "
        "trial has since replaced (set a number to bound the disk a long PBT sweep uses).")


class SweepFile(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    storage_path: str = Field("runs/tune", description="Relative paths: to the working dir.")
    base: BaseSection
    param_space: dict[str, Any] = Field(default_factory=dict)
    tune_config: TuneSection = Field(default_factory=TuneSection)
    trial: TrialSection = Field(default_factory=TrialSection)

    @field_validator("param_space")
    @classmethod
    def _keys(cls, v):
        for key in v:
            if not key or any(not p for p in key.split(".")):
                raise ValueError(f"param_space has an empty key or path part in {key!r}")
        return v


# -- samplers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One entry of ``param_space``: a sampler and its arguments, or a constant."""

    path: str
    kind: str  # one of SAMPLERS, or "constant"
    args: Any

    def candidates(self) -> list:
        """Values to check against the config: every listed value, or the bounds."""
        if self.kind in ("grid_search", "choice"):
            return list(self.args)
        if self.kind == "constant":
            return [self.args]
        lo, hi = self.args[0], self.args[1]
        if self.kind == "randint":
            return [lo, hi - 1]
        return [lo, hi]

    def to_tune(self):
        from ray import tune

        a = self.args
        return {"grid_search": lambda: tune.grid_search(list(a)),
                "choice": lambda: tune.choice(list(a)),
                "uniform": lambda: tune.uniform(*a),
                "loguniform": lambda: tune.loguniform(*a),
                "randint": lambda: tune.randint(*a),
                "quniform": lambda: tune.quniform(*a),
                "constant": lambda: a}[self.kind]()


def parse_param(path: str, spec: Any, where: str = "param_space") -> Param:
    """Reads ``{sampler: args}`` (or a plain value) into a :class:`Param`.

    Raises:
        ConfigError: An unknown sampler or arguments it cannot take.
    """
    if not isinstance(spec, dict):
        return Param(path, "constant", spec)
    if len(spec) != 1:
        raise ConfigError(f"{where}.{path}: a sampler is a mapping with one key (one of "
                          f"{', '.join(SAMPLERS)}), got {sorted(spec)}")
    kind, args = next(iter(spec.items()))
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}.{path}: unknown sampler {kind!r}; use one of "
                          f"{', '.join(SAMPLERS)}")
    if kind in ("grid_search", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{path}: {kind} takes a non-empty list of values")
        return Param(path, kind, tuple(args))
    n = 3 if kind == "quniform" else 2
    form = "[low, high, q]" if n == 3 else "[low, high]"
    if (not isinstance(args, list) or len(args) != n
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in args)):
        raise ConfigError(f"{where}.{path}: {kind} takes {form} numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"{where}.{path}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}.{path}: loguniform needs low > 0, got {args!r}")
    if kind == "randint" and not all(isinstance(x, int) for x in args):
        raise ConfigError(f"{where}.{path}: randint takes integers [low, high) , got {args!r}")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(f"{where}.{path}: quniform needs q > 0, got {args!r}")
    return Param(path, kind, tuple(args))


def _lookup(tree: dict, path: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


# -- the sweep -----------------------------------------------------------------------


class Sweep:
    """A validated sweep file.

    Args:
        path: The sweep YAML.
        sets: ``KEY=VALUE`` overrides. A key under a sweep section
            (``tune_config.num_samples=4``, ``trial.max_failures=0``,
            ``param_space.td3.lr=...``, ``name=...``) changes the sweep; any
            other key (``iterations=5``) is a base config override.

    Raises:
        ConfigError: Naming the first problem found.
    """

    def __init__(self, path: str | Path, sets: list[str] | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise ConfigError(f"sweep file {self.path} does not exist")
        try:
            raw = yaml.safe_load(self.path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{self.path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.path} must hold a mapping at the top level")
        self.raw = _apply_sets(raw, sets or [])
        self.base_data = None
        base = self.raw.get("base")
        if isinstance(base, dict) and base.get("config") is not None:
            self.base_data = self._read_base(base["config"])
        self._init()

    @classmethod
    def from_parts(cls, raw: dict, base_data: dict | None, label: str) -> Sweep:
        """The same sweep from its parsed parts (what a trial on another node gets:
        the files themselves may not exist there)."""
        self = cls.__new__(cls)
        self.path, self.raw, self.base_data = Path(label), copy.deepcopy(raw), base_data
        self._init()
        return self

    def parts(self) -> tuple[dict, dict | None, str]:
        return self.raw, self.base_data, str(self.path)

    def _read_base(self, c: str) -> dict:
        p = Path(c)
        p = p if p.is_absolute() else self.path.parent / p
        if not p.exists():
            raise ConfigError(f"{self.path}: base.config {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: base.config {p} must hold a mapping")
        return data

    def _init(self) -> None:
        try:
            self.spec = SweepFile.model_validate(self.raw)
        except ValidationError as err:
            raise ConfigError(f"{self.path}: " + format_error(err)) from None
        self.name = self.spec.name
        self.params = [parse_param(k, v) for k, v in self.spec.param_space.items()]
        sched = self.spec.tune_config.scheduler
        self.mutations = [parse_param(k, v, "tune_config.scheduler.hyperparam_mutations")
                          for k, v in getattr(sched, "hyperparam_mutations", {}).items()]
        self._validate()

    # -- building trial configs ---------------------------------------------------

    def presets(self) -> list[str | None]:
        """The base presets trials may start from (several when swept)."""
        for p in self.params:
            if p.path == "preset":
                return list(p.args) if p.kind in ("grid_search", "choice") else [p.args]
        return [self.spec.base.preset]

    def trial_config(self, params: dict[str, Any]) -> ExperimentConfig:
        """The experiment config of a trial with these sampled ``params``."""
        params = dict(params)
        preset = params.pop("preset", self.spec.base.preset)
        layered = merge(self.base_data or {},
                         merge(nest_dotted(self.spec.base.set), nest_dotted(params)))
        cfg = build_config(preset, overrides=layered)
        # Samplers such as quniform and PBT's perturbations give floats for
        # integer settings: round those (pydantic rejects 128.0 only if inexact).
        fixed = _integer_params(cfg, params)
        if fixed:
            cfg = build_config(preset, overrides=merge(layered, nest_dotted(fixed)))
        return cfg

    def _check(self, params: dict[str, Any], what: str) -> ExperimentConfig:
        try:
            return self.trial_config(params)
        except ConfigError as err:
            raise ConfigError(f"{self.path}: {what}: {err}") from None

    def _validate(self) -> None:
        tc = self.spec.tune_config
        if "preset" in self.spec.base.set:
            raise ConfigError(f"{self.path}: base.set cannot choose the preset; use base.preset")
        presets = self.presets()
        for p in presets:
            if p is not None and p not in PRESETS:
                raise ConfigError(f"{self.path}: unknown preset {p!r}; choose one of "
                                  f"{sorted(PRESETS)}")
        if presets == [None] and self.spec.base.config is None:
            raise ConfigError(f"{self.path}: base needs a preset or a config file")
        self.base_configs = {p: self._check({"preset": p} if p else {}, f"base (preset {p})")
                             for p in presets}
        for cfg in self.base_configs.values():
            if cfg.resources.pin_to_head:
                raise ConfigError(f"{self.path}: resources.pin_to_head does not apply to "
                                  "trials: each trial's coordinator and replay buffer live "
                                  "with its driver, in its placement group")
            if cfg.resources.num_rollout_workers is None:
                raise ConfigError(
                    f"{self.path}: set resources.num_rollout_workers in base.set: each trial's "
                    "placement group holds exactly that many rollout bundles")
        for param in [*self.params, *self.mutations]:
            if param.path == "preset":
                continue
            for p, cfg in self.base_configs.items():
                found, _ = _lookup(cfg.model_dump(mode="json"), param.path)
                if not found:
                    raise ConfigError(
                        f"{self.path}: {param.path} is not a setting of the config"
                        + (f" (preset {p})" if p else "")
                        + "; see `dqd-ray config" + (f" --preset {p}`" if p else "`"))
                for value in param.candidates():
                    self._check({"preset": p, param.path: value} if p else
                                {param.path: value}, f"{param.path}={value!r}")
        per_preset = [reported(c) | TUNE_METRICS for c in self.base_configs.values()]
        common = frozenset.intersection(*per_preset)
        if tc.metric not in common:
            some = any(tc.metric in m for m in per_preset)
            hint = " by every trial (not all presets report it)" if some else ""
            raise ConfigError(f"{self.path}: tune_config.metric {tc.metric!r} is not reported"
                              f"{hint}; reported: {', '.join(sorted(common))}")
        sched = tc.scheduler
        if isinstance(sched, PBTScheduler):
            for p in self.mutations:
                if p.path not in PBT_MUTABLE:
                    raise ConfigError(
                        f"{self.path}: PBT cannot mutate {p.path}: restoring a checkpoint "
                        "would bring back its saved state; PBT may mutate "
                        + ", ".join(sorted(PBT_MUTABLE)))
                if p.kind in ("grid_search", "constant"):
                    raise ConfigError(f"{self.path}: hyperparam_mutations.{p.path} must be a "
                                      "distribution or a choice list, not " + p.kind)
            for cfg in self.base_configs.values():
                every = cfg.checkpoint.every
                if sched.perturbation_interval % every:
                    raise ConfigError(
                        f"{self.path}: PBT exploits only at reports that carry a checkpoint: "
                        f"perturbation_interval={sched.perturbation_interval} must be a "
                        f"multiple of checkpoint.every={every} (set base.set "
                        f"checkpoint.every: {sched.perturbation_interval})")
        if isinstance(sched, ASHAScheduler):
            its = min(c.iterations for c in self.base_configs.values())
            if sched.grace_period >= (sched.max_t or its):
                raise ConfigError(f"{self.path}: ASHA grace_period={sched.grace_period} must "
                                  f"be below max_t={sched.max_t or its} (the iterations)")

    # -- what Tune gets -----------------------------------------------------------

    def grid_points(self) -> list[dict]:
        """Every combination of the grid-search values (one dict per point)."""
        grids = [p for p in self.params if p.kind == "grid_search"]
        return [dict(zip([p.path for p in grids], combo))
                for combo in itertools.product(*[p.args for p in grids])]

    def num_trials(self) -> int:
        return len(self.grid_points()) * self.spec.tune_config.num_samples

    def param_space(self) -> dict:
        return {p.path: p.to_tune() for p in self.params}

    def bundles(self, cfg: ExperimentConfig) -> list[dict[str, float]]:
        from dqd_ray.runtime.resources import trial_bundles

        return trial_bundles(cfg, self.spec.trial.driver_cpus)

    def storage_path(self) -> Path:
        return Path(self.spec.storage_path).expanduser().resolve()

    def experiment_dir(self) -> Path:
        return self.storage_path() / self.name


def reported(cfg: ExperimentConfig) -> frozenset:
    from dqd_ray.loop import reported_metrics

    return reported_metrics(cfg)


def _integer_params(cfg: ExperimentConfig, params: dict) -> dict:
    dump = cfg.model_dump(mode="json")
    fixed = {}
    for path, value in params.items():
        found, current = _lookup(dump, path)
        if (found and isinstance(value, float) and isinstance(current, int)
                and not isinstance(current, bool) and math.isfinite(value)):
            fixed[path] = int(round(value))
    return fixed


def _apply_sets(raw: dict, sets: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in sets:
        nested = parse_set(item)
        key = item.split("=", 1)[0]
        head, _, rest = key.partition(".")
        value = _lookup(nested, key)[1]
        if head in ("param_space",) and rest:
            raw.setdefault("param_space", {})[rest] = value
        elif head == "base" and rest.startswith("set.") and len(rest) > 4:
            raw.setdefault("base", {}).setdefault("set", {})[rest[4:]] = value
        elif key == "preset":  # the base preset (base.set cannot change it)
            raw.setdefault("base", {})["preset"] = value
        elif head in SweepFile.model_fields:
            raw = merge(raw, nested)
        else:  # an experiment setting: a base override
            base = raw.setdefault("base", {})
            if not isinstance(base, dict):
                raise ConfigError("the sweep's base must be a mapping")
            base.setdefault("set", {})[key] = value
    return raw


