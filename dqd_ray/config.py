"""One typed, validated configuration for every run, local or on a cluster.

A config is built from layers: defaults <- preset <- YAML file <- ``--set``
overrides, then validated once. Unknown keys and impossible values fail here,
naming the field, before any work starts.

Defaults follow the CMA-MEGA (TD3, ES) paper where a laptop can afford them;
the paper's value is given in each field's description where it differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dqd_ray import algorithms
from dqd_ray.algorithms import PAPER_PRESETS, PRESETS  # noqa: F401 - re-exported
from dqd_ray.presets import merge


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnvConfig(_Strict):
    id: str = Field("QDAntBulletEnv-v0", description="Gymnasium id of a QD environment.")
    episode_length: int = Field(1000, gt=0, description="Steps before truncation.")
    archive_dims: list[int] | None = Field(
        None, description="Cells per measure; default from the env's metadata."
    )
    archive_ranges: list[tuple[float, float]] | None = Field(
        None, description="(low, high) per measure; default from the env's metadata."
    )

    @field_validator("id")
    @classmethod
    def _known_env(cls, v: str) -> str:
        from dqd_ray.envs import ENV_IDS

        if v not in ENV_IDS:
            raise ValueError(f"unknown env id {v!r}; choose one of {list(ENV_IDS)}")
        return v

    @field_validator("archive_dims")
    @classmethod
    def _dims(cls, v):
        if v is not None and (len(v) == 0 or any(d < 1 for d in v)):
            raise ValueError(f"archive_dims must be a non-empty list of positive ints, got {v}")
        return v

    @field_validator("archive_ranges")
    @classmethod
    def _ranges(cls, v):
        if v is not None and any(lo >= hi for lo, hi in v):
            raise ValueError(f"every archive range needs low < high, got {v}")
        return v

    @model_validator(mode="after")
    def _fill_from_metadata(self):
        from dqd_ray.envs import env_metadata

        meta = env_metadata(self.id)
        for name in ("archive_dims", "archive_ranges"):
            v = getattr(self, name)
            if v is not None and len(v) != meta.measure_dim:
                raise ValueError(
                    f"{name} has {len(v)} entries but {self.id} has {meta.measure_dim} measures"
                )
        # Resolved here, so a dumped config (and `dqd-ray config`) shows the archive.
        if self.archive_dims is None:
            self.__dict__["archive_dims"] = list(meta.archive_dims)
        if self.archive_ranges is None:
            self.__dict__["archive_ranges"] = [(0.0, 1.0)] * meta.measure_dim
        return self

    def resolved_dims(self) -> list[int]:
        from dqd_ray.envs import env_metadata

        return list(self.archive_dims or env_metadata(self.id).archive_dims)

    def resolved_ranges(self) -> list[tuple[float, float]]:
        from dqd_ray.envs import env_metadata

        m = env_metadata(self.id).measure_dim
        return list(self.archive_ranges or [(0.0, 1.0)] * m)


class PolicyConfig(_Strict):
    hidden_sizes: list[int] = Field([128, 128], description="Hidden layer widths of the MLP.")
    activation: Literal["tanh", "relu"] = Field("tanh", description="Hidden activation.")

    @field_validator("hidden_sizes")
    @classmethod
    def _positive(cls, v):
        if any(h < 1 for h in v):
            raise ValueError(f"hidden_sizes must be positive, got {v}")
        return v


def _algorithm_union():
    """The union of every registered algorithm's settings (told apart by ``name``)."""
    return Union[tuple(algorithms.configs().values())]  # noqa: UP007


AnyAlgorithmConfig = Annotated[_algorithm_union(), Field(discriminator="name")]


class TD3Config(_Strict):
    critic_hidden_sizes: list[int] = Field([256, 256], description="Critic MLP widths (ReLU).")
    batch_size: int = Field(256, gt=0, description="Transitions per update.")
    gamma: float = Field(0.99, gt=0, le=1)
    tau: float = Field(0.005, gt=0, le=1, description="Target soft-update rate.")
    policy_delay: int = Field(2, gt=0, description="Critic updates per actor update.")
    target_noise: float = Field(0.2, ge=0, description="Target policy smoothing noise.")
    noise_clip: float = Field(0.5, ge=0, description="Clip of the smoothing noise.")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate of actors and critics.")
    train_steps_per_iteration: int = Field(
        50, ge=0, description="Critic updates per iteration in sync mode, on the experience "
        "up to the previous iteration, run while the branches are evaluated "
        "(paper: 600 for CMA-MEGA (TD3, ES), 300 for PGA-ME)."
    )
    jacobian_states: int = Field(
        256, gt=0, description="Buffer states averaged over for each gradient (paper: 65,536)."
    )
    time_limit_done: bool = Field(
        False, description="Treat episodes cut by the time limit as done (the paper's choice, "
        "true in its presets). False bootstraps through the cut: the correct TD target."
    )
    replay_capacity: int = Field(1_000_000, gt=0, description="Replay buffer transitions.")
    learning_starts: int = Field(
        256, ge=0, description="Transitions in the buffer before critics train."
    )
    async_replay_ratio: float | None = Field(
        None, gt=0, description="Async learners: at most this many sampled transitions "
        "(updates x batch_size) per transition ever added to the buffer; past it a learner "
        "waits for new experience. None: train as fast as it can (a learner with its own "
        "GPU or CPUs). A cap keeps a learner that shares a machine with rollout workers "
        "from taking their CPU."
    )
    update_mode: Literal["eager", "compile", "cudagraphs"] = Field(
        "eager", description="How a learner runs each TD3 update (the same numbers, to float "
        "rounding, in every mode). eager: op by op. compile: the whole update step (losses, "
        "backward, Adam steps, target soft-update) through torch.compile. cudagraphs: two "
        "CUDA graphs (a critic update, and a critic update with the delayed actor update and "
        "target soft-update) captured once with capturable Adam, replayed every update after "
        "copying its batch and target-policy noise into static buffers; needs a learner on a "
        "GPU (resources.num_gpus_per_learner > 0, a GPU torch sees), else the learner stops "
        "at start with a message. Measure with `dqd-ray bench learner --mode eager compile "
        "cudagraphs --device cuda`."
    )
    compile: bool = Field(
        False, description="The older switch for update_mode=compile: true means "
        "update_mode=compile (with update_mode=cudagraphs it is an error)."
    )

    @model_validator(mode="after")
    def _one_update_mode(self):
        if self.compile and self.update_mode == "cudagraphs":
            raise ValueError("td3.compile=true and td3.update_mode=cudagraphs ask for two update "
                             "modes: keep td3.update_mode=cudagraphs and set td3.compile=false")
        return self


class ESConfig(_Strict):
    sigma: float = Field(0.02, gt=0, description="Std of the Gaussian perturbations.")
    num_samples: int = Field(100, ge=2, description="Evaluations per estimate (mirrored, even).")

    @field_validator("num_samples")
    @classmethod
    def _even(cls, v):
        if v % 2:
            raise ValueError(f"num_samples must be even (mirrored sampling), got {v}")
        return v


class ResourcesConfig(_Strict):
    num_rollout_workers: int | None = Field(
        None, description="Rollout actors; default: CPUs Ray sees minus learner/coordinator."
    )

    @field_validator("num_rollout_workers")
    @classmethod
    def _at_least_one_worker(cls, v):
        if v is not None and v < 1:
            raise ValueError(
                f"a run needs at least 1 rollout worker, got {v}: set a positive number, or "
                "leave it unset (null) for one per CPU left after the learners and coordinator")
        return v

    envs_per_worker: int = Field(4, gt=0, description="Environments stepped in lockstep.")
    num_learners: int = Field(1, gt=0, description="Learner actors sharing the critics.")
    num_gpus_per_learner: float = Field(0.0, ge=0, description="0 means CPU learners.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs each rollout actor asks Ray for (fractions share a core)."
    )
    cpus_per_learner: float = Field(
        1.0, gt=0, description="CPUs each CPU learner asks Ray for (GPU learners ask for none)."
    )
    share_learner_cpus: bool | None = Field(
        None, description="A CPU learner shares the rollout workers' cores (asks Ray for no "
        "CPU, and the default worker count is every CPU) instead of reserving "
        "cpus_per_learner of its own. None (auto): shares in sync learner mode on a Ray this "
        "process started (one machine), where the learner trains only inside each iteration "
        "and a reserved core would sit idle most of it; reserves in async mode (training "
        "never stops), on a joined cluster and in a Tune trial."
    )
    rollout_resource: str | None = Field(
        None, description="A custom resource each rollout worker also asks for "
        "(cpus_per_worker of it), e.g. `rollout`, offered by the rollout nodes."
    )
    learner_resource: str | None = Field(
        None, description="A custom resource each learner also asks for (1 of it), e.g. "
        "`learner`, offered by the learner nodes."
    )
    pin_to_head: bool = Field(
        False, description="Place the coordinator and replay buffer on the head node."
    )
    replay_resource: str | None = Field(
        None, description="A custom resource the replay buffer asks for (1 of it), e.g. a "
        "high-memory node type's; takes precedence over pin_to_head for the buffer."
    )
    wait_for_resources_s: float = Field(
        600.0, ge=0, description="When joining a cluster whose resources cannot hold the "
        "graph yet, how long to wait for the autoscaler before failing; also how long a "
        "restarting actor (its node died) may take to be placed again before the run stops."
    )
    call_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of every call to a role (a rollout chunk, a "
        "replay add or sample, a learner request, the coordinator's liveness): a live actor "
        "that does not answer within it (a wedged node) stops the run with a message naming "
        "the role, the call and the node; the last checkpoint stays the resume point. "
        "Generous by default: no healthy call comes near it."
    )
    strict_gpu: bool = Field(False, description="Fail instead of falling back to CPU.")
    learner_mode: Literal["sync", "async"] = Field(
        "async", description="sync: fixed updates per iteration (reproducible)."
    )
    chunk_size: int = Field(1000, gt=0, description="Transitions per replay add.")
    torch_threads: int | None = Field(
        None, gt=0, description="Torch intra-op threads per learner. None: a CPU learner "
        "uses one per CPU it asks Ray for, max(1, round(cpus_per_learner)), so one when it "
        "has a share of a core (e.g. 0.5) or shares the workers' cores (the same in "
        "process); a GPU learner keeps torch's default. Measure the scaling with "
        "`dqd-ray bench learner --threads 1 2 4`."
    )


class MetricsConfig(_Strict):
    robustness_every: int = Field(
        0, ge=0, description="Iterations between robustness measurements of the best elite "
        "(0: never; paper: every iteration). Re-used while the best elite is unchanged."
    )
    robustness_episodes: int = Field(
        10, gt=0, description="New-seed episodes of the best elite per measurement (paper: 10)."
    )


class LoggingConfig(_Strict):
    wandb: bool = Field(False, description="Log to wandb (offline without an API key).")
    wandb_project: str = Field("dqd-ray")
    wandb_group: str | None = None
    heatmap_every: int = Field(25, gt=0, description="Iterations between archive heatmaps.")
    wandb_finish_timeout_s: float = Field(
        60.0, ge=0, description="Seconds the end of a run waits for wandb uploads (0: no limit); "
        "what is left stays on disk for `wandb sync`."
    )
    progress_bar: bool = True
    final_gif: bool = Field(
        True, description="At the end of a run, replay the best elite and write "
        "RUN_DIR/best_elite.gif (also to wandb when it is on)."
    )
    gif_steps: int | None = Field(
        None, gt=0, description="Steps of the final GIF's episode (default: env.episode_length)."
    )
    gif_frame_every: int = Field(4, gt=0, description="Env steps per frame of the final GIF.")


class CheckpointConfig(_Strict):
    every: int = Field(10, gt=0, description="Iterations between checkpoints.")
    keep: int = Field(3, gt=0, description="Checkpoints kept.")
    save_replay: bool = Field(True, description="Store replay buffer contents.")
    learner_snapshot_every: int = Field(
        5, ge=0, description="On Ray: iterations between the copies of the critics the "
        "coordinator keeps in memory to restore a learner restarted after its node died "
        "(0: none; a restarted learner then starts from scratch)."
    )


class ExperimentConfig(_Strict):
    """A whole experiment. See each section for its fields."""

    preset: str | None = Field(None, description="Preset this config started from.")
    seed: int = Field(0, ge=0, description="Root seed; all randomness flows from it.")
    iterations: int = Field(100, gt=0, description="Iteration budget.")
    evaluations: int | None = Field(None, gt=0, description="Optional evaluation budget.")
    env: EnvConfig = Field(default_factory=EnvConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    algorithm: AnyAlgorithmConfig = Field(
        default_factory=lambda: algorithms.get(algorithms.DEFAULT_ALGORITHM).config())
    td3: TD3Config = Field(default_factory=TD3Config)
    es: ESConfig = Field(default_factory=ESConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_algorithm_name(cls, data):
        algo = data.get("algorithm") if isinstance(data, dict) else None
        if isinstance(algo, dict) and "name" not in algo:
            data = {**data, "algorithm": {"name": algorithms.DEFAULT_ALGORITHM, **algo}}
        return data

    def needs(self) -> algorithms.Needs:
        """What the configured algorithm asks of the system (its module's ``needs``)."""
        return algorithms.get(self.algorithm.name).needs(self.algorithm,
                                                         len(self.env.resolved_dims()))

    @property
    def uses_td3(self) -> bool:
        """Whether any TD3 critic is trained (gradients, greedy actor or PG variation)."""
        return bool(self.needs().critic_objectives)

    @property
    def uses_es(self) -> bool:
        """Whether some gradient rows are estimated by evolution strategies."""
        return bool(self.needs().es_rows)


def _rebuild_algorithm_union(_algorithm=None) -> None:
    """A newly registered algorithm joins the config's algorithm union."""
    ExperimentConfig.model_fields["algorithm"].annotation = _algorithm_union()
    ExperimentConfig.model_rebuild(force=True)


algorithms.on_register(_rebuild_algorithm_union)


class ConfigError(ValueError):
    """A configuration problem, with the field it concerns in the message."""


def parse_set(item: str) -> dict:
    """Turns ``"td3.batch_size=128"`` into ``{"td3": {"batch_size": 128}}``."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. td3.batch_size=128), got {item!r}")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML "
                          f"({_yaml_problem(err)}); write lists as [1, 2] and quote text "
                          "with brackets or colons") from None
    return nest_dotted({key: value})


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What a YAML parser error says, with its line and column (1-based)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def nest_dotted(flat: dict[str, Any]) -> dict:
    """``{"td3.lr": 1e-3, "seed": 2}`` -> ``{"td3": {"lr": 1e-3}, "seed": 2}``."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def format_error(err: ValidationError) -> str:
    """A validation error as one readable line per field (the field's dotted path first)."""
    configs = algorithms.configs()
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        parts = [str(p) for p in e["loc"]]
        if len(parts) >= 3 and parts[0] == "algorithm" and parts[1] in configs:
            name = parts[1]
            loc = ".".join([parts[0], *parts[2:]])
            if e["type"] == "extra_forbidden":
                owners = [n for n, c in configs.items() if parts[2] in c.model_fields]
                fields = [f for f in configs[name].model_fields if f != "name"]
                msg = ("" if owners else "unknown key: ") + (f"not a setting of algorithm {name}"
                       + (f" (it belongs to {', '.join(owners)})" if owners else "")
                       + f"; {name} takes: {', '.join(fields)}")
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `dqd-ray config` prints every setting)"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown algorithm; choose one of {list(configs)}"
        lines.append(f"  {loc}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(
    preset: str | None = None,
    file: str | Path | None = None,
    sets: list[str] | None = None,
    overrides: dict | None = None,
) -> ExperimentConfig:
    """Builds and validates a config from its layers.

    Args:
        preset: One of :data:`PRESETS`.
        file: A YAML file with any subset of the fields.
        sets: ``key=value`` overrides with dotted keys.
        overrides: A dict merged last.

    Raises:
        ConfigError: Naming the field that is wrong.
    """
    data: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file: pass a YAML file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: "
                              f"{_yaml_problem(err)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = merge(data, loaded)
    for item in sets or []:
        data = merge(data, parse_set(item))
    if overrides:
        data = merge(data, overrides)
    if preset is not None:
        data["preset"] = preset  # an explicit preset wins over the file's label
    preset = data.get("preset")
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = merge(PRESETS[preset], {"preset": preset})
    try:
        return ExperimentConfig.model_validate(merge(base, data))
    except ValidationError as err:
        raise ConfigError(format_error(err)) from None


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def load_yaml(path: str | Path) -> ExperimentConfig:
    return build_config(file=path)
