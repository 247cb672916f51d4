"""Seeds, sizes and every resource computation of a run's graph: the fit
checks, the autoscaler request and the actors' bundles (used by Tune too)."""

from __future__ import annotations

import logging
import time

import numpy as np

from dqd_ray import algorithms
from dqd_ray.config import ConfigError, ExperimentConfig
from dqd_ray.roles.policy import PolicySpec

log = logging.getLogger(__name__)


# -- seeds and sizes -----------------------------------------------------------------


class Seeds:
    """All seeds of a run, spawned from the root seed."""

    def __init__(self, root: int):
        ss = np.random.SeedSequence(root)
        (self.coordinator, self.policy, self.replay, self.learners,
         self.es, self.workers) = ss.spawn(6)

    @staticmethod
    def to_int(ss: np.random.SeedSequence) -> int:
        return int(ss.generate_state(1)[0])


def algorithm_needs(cfg: ExperimentConfig) -> algorithms.Needs:
    return cfg.needs()


def evaluations_per_iteration(cfg: ExperimentConfig) -> int:
    """Evaluations one iteration counts, from the config alone (robustness
    re-evaluations are not counted)."""
    return algorithms.get(cfg.algorithm.name).evaluations_per_iteration(cfg, cfg.needs())


def learner_objectives(cfg: ExperimentConfig) -> list[int]:
    """Objectives with a TD3 critic (none: no learner is built)."""
    return list(algorithm_needs(cfg).critic_objectives)


def split_objectives(objectives: list[int], num_learners: int) -> list[list[int]]:
    """Splits the critics between learners as evenly as possible (none empty)."""
    n = max(1, min(num_learners, len(objectives)))
    return [[int(o) for o in part] for part in np.array_split(objectives, n)]


def initial_theta(cfg: ExperimentConfig, spec: PolicySpec, seeds: Seeds) -> np.ndarray:
    if cfg.algorithm.x0_from_policy_init:
        return spec.init_genome(np.random.default_rng(seeds.policy))
    return np.zeros(spec.genome_dim, np.float32)


class GPUUnavailableError(RuntimeError):
    pass


class ResourceError(RuntimeError):
    """The graph cannot be placed on the resources it was given."""


# Settings that place or size Ray actors: in process they have nothing to act on
# (cpus_per_learner still sets a learner's default torch threads there).
RAY_ONLY_RESOURCES = ("cpus_per_worker", "share_learner_cpus", "rollout_resource",
                      "learner_resource", "replay_resource", "pin_to_head",
                      "wait_for_resources_s", "call_timeout_s")


def _warn_ray_only_fields(r) -> None:
    default = type(r)()
    changed = [f"resources.{k}={getattr(r, k)!r}" for k in RAY_ONLY_RESOURCES
               if getattr(r, k) != getattr(default, k)]
    if changed:
        _warn(", ".join(changed) + ": Ray placement settings; in process every role runs "
              "in this one process, so they have no effect here")


def _warn(msg: str) -> None:
    log.warning(msg)
    print(f"warning: {msg}")


def _placement_group_resources() -> dict | None:
    """Total resources of the placement group this process runs in (a Tune
    trial), or None outside one."""
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    return None if pg is None else sum_bundles(pg.bundle_specs)


def _started_here() -> bool:
    """Whether this process started the Ray it is connected to (``ray.init()``
    without an address): nothing will add resources to it."""
    try:
        import ray._private.worker as rw

        return bool(getattr(rw.global_worker.node, "head", False))
    except Exception:  # noqa: BLE001 - an unknown Ray layout: treat as a cluster
        return False


def shares_learner_cpus(cfg: ExperimentConfig, gpus: float, in_trial: bool = False) -> bool:
    """Whether the CPU learners share the rollout workers' cores (ask Ray for no
    CPU) rather than reserve ``cpus_per_learner`` each: see
    ``resources.share_learner_cpus``. ``in_trial``: sizing a Tune trial's bundles."""
    r = cfg.resources
    if gpus > 0 or not _num_learners(cfg):
        return False
    if r.share_learner_cpus is not None:
        return bool(r.share_learner_cpus)
    if in_trial or r.learner_mode != "sync":
        return False
    import ray

    if not ray.is_initialized():  # in process: nothing asks Ray for anything
        return False
    return _placement_group_resources() is None and _started_here()


def learner_cpus(cfg: ExperimentConfig, gpus: float, in_trial: bool = False) -> float:
    """The CPUs each learner actor asks Ray for."""
    if gpus > 0 or shares_learner_cpus(cfg, gpus, in_trial):
        return 0.0
    return float(cfg.resources.cpus_per_learner)


def actor_bundles(cfg: ExperimentConfig, n_workers: int, gpus: float,
                  in_trial: bool = False) -> tuple[list[dict], list[dict]]:
    """The resources each rollout worker and each learner actor asks for
    (``gpus`` per learner: 0 means CPU learners)."""
    r = cfg.resources
    objs = learner_objectives(cfg)
    n_learners = len(split_objectives(objs, r.num_learners)) if objs else 0
    worker = {"CPU": float(r.cpus_per_worker)}
    if r.rollout_resource:
        worker[r.rollout_resource] = float(r.cpus_per_worker)
    learner = {"GPU": float(gpus)} if gpus > 0 else {"CPU": learner_cpus(cfg, gpus, in_trial)}
    if r.learner_resource:
        learner[r.learner_resource] = 1.0
    return [dict(worker) for _ in range(n_workers)], [dict(learner) for _ in range(n_learners)]


def graph_bundles(cfg: ExperimentConfig, n_workers: int, gpus: float) -> list[dict]:
    """One resource bundle per actor of the graph that asks for resources (what
    the autoscaler must find room for, node by node)."""
    workers, learners = actor_bundles(cfg, n_workers, gpus)
    bundles = [*workers, *learners]
    if cfg.resources.replay_resource:
        bundles.append({cfg.resources.replay_resource: 1.0})
    bundles = [{k: v for k, v in b.items() if v > 0} for b in bundles]
    return [b for b in bundles if b]  # a learner sharing the workers' cores asks for nothing


def graph_needs(cfg: ExperimentConfig, n_workers: int, gpus: float) -> dict[str, float]:
    """The Ray resources the whole graph asks for (the sum over its actors)."""
    return {"CPU": 0.0, **sum_bundles(graph_bundles(cfg, n_workers, gpus))}


def sum_bundles(bundles) -> dict[str, float]:
    """The resources of several bundles together."""
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def fits(bundle: dict, node: dict) -> bool:
    """Whether one node's resources can hold ``bundle``."""
    return all(v <= node.get(k, 0.0) + 1e-9 for k, v in bundle.items())


def _missing(need: dict, have: dict) -> dict[str, tuple[float, float]]:
    return {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}


def _describe(missing: dict, where: str, n: int, cfg: ExperimentConfig) -> str:
    parts = ", ".join(f"{k} {v:g} (has {h:g})" for k, (v, h) in missing.items())
    return (f"the graph ({n} rollout workers x {cfg.resources.cpus_per_worker:g} CPU, "
            f"learners, coordinator, replay) needs {parts} but {where} does not have them: "
            "lower resources.num_rollout_workers (or cpus_per_worker, num_learners, "
            "num_gpus_per_learner), drop resources.rollout_resource/learner_resource/"
            "replay_resource on a "
            "machine that does not offer them, or add nodes")


def resolve_resources(cfg: ExperimentConfig, placement="ray") -> tuple[int, float]:
    """(rollout workers, GPUs per learner) on ``placement`` (a placement or its
    name): see :func:`resolve_in_process` and :func:`resolve_on_ray`.

    Raises:
        GPUUnavailableError: GPUs requested strictly but there are none.
        ResourceError: The graph cannot fit, naming what is missing.
    """
    from dqd_ray.runtime.placement import make_placement

    if isinstance(placement, str):
        placement = make_placement(placement, cfg.resources)
    return placement.resolve(cfg)


def _num_learners(cfg: ExperimentConfig) -> int:
    objs = learner_objectives(cfg)
    return len(split_objectives(objs, cfg.resources.num_learners)) if objs else 0


def _learner_gpus(cfg: ExperimentConfig, have_gpus: float, where: str, wait: bool) -> float:
    """GPUs per learner: the configured number, or 0 (CPU learners, with a
    warning) when ``where`` has too few, unless ``resources.strict_gpu``. A
    cluster that may still bring GPU nodes (``wait``) is waited for instead."""
    r = cfg.resources
    gpus, n_learners = r.num_gpus_per_learner, _num_learners(cfg)
    if gpus > 0 and n_learners and have_gpus < gpus * n_learners and not wait:
        msg = (f"resources.num_gpus_per_learner={gpus} x {n_learners} learners "
               f"but {where} has {have_gpus} GPUs")
        if r.strict_gpu:
            raise GPUUnavailableError(msg + " (resources.strict_gpu=true)")
        _warn(f"{msg}; using CPU learners instead")
        gpus = 0.0
    return gpus


def resolve_in_process(cfg: ExperimentConfig) -> tuple[int, float]:
    """In process: one worker unless set, GPUs if torch sees one."""
    import torch

    gpus = _learner_gpus(cfg, torch.cuda.device_count(), "this process", wait=False)
    n = cfg.resources.num_rollout_workers
    return (1 if n is None else n), gpus


def resolve_on_ray(cfg: ExperimentConfig) -> tuple[int, float]:
    """On Ray: sized from the placement group this process runs in (a Tune
    trial: its bundles are all the graph may use), else from the connected
    cluster's resources. A graph that cannot fit is an error at once when this
    process started Ray itself (or in a placement group); on a cluster joined
    by address the autoscaler gets ``resources.wait_for_resources_s`` to add
    nodes, with a message every 30 s."""
    import ray

    r = cfg.resources
    pg = _placement_group_resources()
    res = pg if pg is not None else ray.cluster_resources()
    where = "the trial's placement group" if pg is not None else "the cluster"
    # On a cluster joined by address the autoscaler may still bring GPU nodes:
    # missing GPUs are waited for below like any other resource.
    joined = pg is None and not _started_here()
    gpus = _learner_gpus(cfg, res.get("GPU", 0), where, wait=joined)
    reserved = _num_learners(cfg) * learner_cpus(cfg, gpus)
    n = r.num_rollout_workers
    if n is None:
        n = max(1, int((res.get("CPU", 1) - reserved) / r.cpus_per_worker + 1e-9))
    need = graph_needs(cfg, n, gpus)
    bundles = graph_bundles(cfg, n, gpus)
    missing = _missing(need, res)
    # Totals are not enough: each actor's bundle must fit on one node, or it
    # waits forever (a placement group's bundles were placed by Tune already).
    homeless = [] if pg is not None else _homeless(bundles, _node_resources())
    if not missing and not homeless:
        return n, gpus
    if pg is not None:  # nothing will ever add resources to a placement group
        raise ResourceError(_describe(missing, where, n, cfg)
                            + "; the trial's bundles must match its config")
    if _started_here():
        if missing:
            raise ResourceError(_describe(missing, "this machine's Ray", n, cfg))
        raise ResourceError(_describe_homeless(homeless, "this machine's Ray"))
    _request_from_autoscaler(bundles)
    t0 = time.monotonic()
    last_msg = -1e9
    while (missing or homeless) and time.monotonic() - t0 < r.wait_for_resources_s:
        if time.monotonic() - last_msg >= 30:
            _warn(f"waiting up to {r.wait_for_resources_s:g} s for the autoscaler: "
                  + ", ".join([f"{k} {v:g} needed, {h:g} now" for k, (v, h) in missing.items()]
                              + [f"a node for {b}" for b in homeless[:1]]))
            last_msg = time.monotonic()
        time.sleep(min(2.0, max(0.0, r.wait_for_resources_s - (time.monotonic() - t0))))
        missing = _missing(need, ray.cluster_resources())
        homeless = _homeless(bundles, _node_resources())
    if missing or homeless:
        _request_from_autoscaler([])  # withdraw the request: nothing will use it
        where = f"the cluster (after waiting {r.wait_for_resources_s:g} s)"
        if missing:
            raise ResourceError(_describe(missing, where, n, cfg))
        raise ResourceError(_describe_homeless(homeless, where))
    return n, gpus


def _node_resources() -> list[dict]:
    """Each live node's total resources (what one actor's bundle can be given)."""
    import ray

    return [dict(nd.get("Resources", {}), _ip=nd.get("NodeManagerAddress", "?"))
            for nd in ray.nodes() if nd.get("Alive")]


def _homeless(bundles: list[dict], nodes: list[dict]) -> list[dict]:
    """The bundles that no single node can hold (deduplicated, in order)."""
    out: list[dict] = []
    for b in bundles:
        if b not in out and not any(fits(b, nd) for nd in nodes):
            out.append(b)
    return out


def _describe_homeless(homeless: list[dict], where: str) -> str:
    bundle = ", ".join(f"{k} {v:g}" for k, v in homeless[0].items())
    return (f"an actor of the graph asks for {{{bundle}}} in one bundle but no single node "
            f"of {where} can hold it, although the totals would: lower "
            "resources.cpus_per_worker or cpus_per_learner (or num_gpus_per_learner), or add "
            "a node type that large")


def _request_from_autoscaler(bundles: list[dict]) -> None:
    """Asks the cluster's autoscaler to make room for ``bundles`` (nodes of types
    with ``min_workers: 0`` start only on such demand); an empty list withdraws
    the request. A cluster without an autoscaler ignores it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
        if bundles:
            print(f"asked the autoscaler for {len(bundles)} resource bundles "
                  f"({', '.join(sorted({k for b in bundles for k in b}))})", flush=True)
    except Exception as e:  # noqa: BLE001 - waiting still works, only slower
        log.warning("could not ask the autoscaler for %d bundles: %s", len(bundles), e)


# -- a Tune trial's bundles ----------------------------------------------------------


def trial_bundles(cfg: ExperimentConfig, driver_cpus: float = 1.0) -> list[dict[str, float]]:
    """One trial's placement-group bundles: its driver (and the replay buffer's
    custom resource, if any), then one per rollout worker, then one per
    learner (GPUs in the learner bundles). Each actor of the trial asks for
    exactly one bundle's resources."""
    r = cfg.resources
    head = {"CPU": float(driver_cpus)} if driver_cpus else {}
    if r.replay_resource:  # the replay buffer lives in the trial's own bundle
        head[r.replay_resource] = 1.0
    workers, learners = actor_bundles(cfg, r.num_rollout_workers or 1, r.num_gpus_per_learner,
                                      in_trial=True)
    # A learner that shares the workers' cores asks for nothing: no bundle of its own.
    learners = [b for b in learners if any(v > 0 for v in b.values())]
    return [head, *workers, *learners]


def describe_bundles(bundles: list[dict], cfg: ExperimentConfig) -> str:
    n_workers = cfg.resources.num_rollout_workers or 1
    head, workers, learners = bundles[0], bundles[1:1 + n_workers], bundles[1 + n_workers:]

    def fmt(b):
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}"

    parts = [f"driver {fmt(head) if head else '{} (no resources)'}",
             f"{len(workers)} x rollout {fmt(workers[0])}"]
    if learners:
        parts.append(f"{len(learners)} x learner {fmt(learners[0])}")
    return ", ".join(parts) + f"  = {fmt(sum_bundles(bundles))}"


def check_fits(bundles: list[dict], cluster: dict[str, float], nodes: list[dict],
               where: str) -> None:
    """Raises ConfigError when one trial's bundles cannot be placed."""
    for k, (v, have) in _missing(sum_bundles(bundles), cluster).items():
        raise ConfigError(
            f"one trial needs {v:g} {k} but {where} has {have:g}: lower "
            "resources.num_rollout_workers / resources.cpus_per_worker / "
            "trial.driver_cpus (or num_gpus_per_learner), or add nodes")
    for b in bundles:
        if b and not any(fits(b, node) for node in nodes):
            raise ConfigError(f"no node of {where} can hold the bundle {b}")
