"""The one registry of algorithms, built from their modules.

An algorithm is a module (or any object) that declares everything about itself:

- ``Config``: its settings, an :class:`~dqd_ray.algorithms.base.AlgorithmSettings`
  subclass whose ``name`` literal is the algorithm's name;
- ``needs(settings, measure_dim) -> Needs``: what it asks of the system;
- ``build_scheduler(settings, ctx) -> MaskedScheduler``: its archives and emitters;
- ``evaluations_per_iteration(cfg, needs) -> int``: evaluations one iteration
  counts, from the experiment config alone;
- ``first_half_evaluations(cfg, needs) -> int`` (optional, default 0): what is
  evaluated before the gradients are needed (the ES samples of theta), for
  ``bench iteration``'s projection;
- ``state_classes() -> (classes, arrays)`` (optional): the classes its
  checkpoint state may hold, and ``{class: {attribute: ArraySpec}}`` for arrays
  that are None on a freshly built object (see :mod:`dqd_ray.state.statecodec`);
  called the first time a checkpoint is written or read, so that declaring an
  algorithm imports no pyribs (the config imports every algorithm's settings).
  ``STATE_CLASSES`` and ``STATE_ARRAYS`` say the same eagerly;
- ``PRESETS`` (optional): ``{preset: settings overrides}``, and
  ``PAPER_PRESETS``: which of them hold a paper's settings.

:func:`register` adds one; it feeds the config's algorithm union, the
checkpoint allowlist, the presets and the CLI's choices. Nothing outside
:mod:`dqd_ray.algorithms` branches on an algorithm's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dqd_ray.algorithms.base import AlgorithmSettings, Needs
from dqd_ray.state import statecodec


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One registered algorithm (see the module docstring for each field)."""

    name: str
    config: type[AlgorithmSettings]
    needs: Callable[[Any, int], Needs]
    build_scheduler: Callable
    evaluations_per_iteration: Callable[[Any, Needs], int]
    first_half_evaluations: Callable[[Any, Needs], int]
    presets: dict[str, dict]
    paper_presets: tuple[str, ...]
    source: Any


ALGORITHMS: dict[str, Algorithm] = {}
PRESETS: dict[str, dict[str, Any]] = {}
"""Every preset of every registered algorithm: settings overrides of the defaults."""
PAPER_PRESETS: list[str] = []
"""The presets that hold a paper's settings (official configs)."""
DEFAULT_ALGORITHM = "cma_mega"

_listeners: list[Callable[[Algorithm], None]] = []


def on_register(fn: Callable[[Algorithm], None]) -> None:
    """Calls ``fn(algorithm)`` for every algorithm registered from now on (the
    config module rebuilds its algorithm union this way)."""
    _listeners.append(fn)


def _no_first_half(cfg, needs: Needs) -> int:
    return 0


def _declare_state(source: Any) -> None:
    """Puts the classes ``source`` declares on the checkpoint allowlist."""
    if hasattr(source, "state_classes"):
        classes, arrays = source.state_classes()
    else:
        classes = getattr(source, "STATE_CLASSES", ())
        arrays = getattr(source, "STATE_ARRAYS", {})
    statecodec.allow(*classes)
    for cls, specs in arrays.items():
        statecodec.expect(cls, **specs)


def register(source: Any) -> Algorithm:
    """Registers the algorithm ``source`` declares (a module, a class, a namespace).

    Registering the same source again returns its entry; another source with
    a name, or a preset, already taken is refused.
    """
    missing = [a for a in ("Config", "needs", "build_scheduler", "evaluations_per_iteration")
               if not hasattr(source, a)]
    if missing:
        raise TypeError(f"{source!r} does not declare {', '.join(missing)}: an algorithm "
                        "declares Config, needs, build_scheduler and "
                        "evaluations_per_iteration (see dqd_ray.algorithms.registry)")
    config = source.Config
    if not (isinstance(config, type) and issubclass(config, AlgorithmSettings)):
        raise TypeError(f"{source!r}.Config must subclass AlgorithmSettings")
    name = config.model_fields["name"].default if "name" in config.model_fields else None
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config.__name__} needs a `name: Literal[...]` field with a default")
    if name in ALGORITHMS:
        if ALGORITHMS[name].source is source:
            return ALGORITHMS[name]
        raise ValueError(f"algorithm {name!r} is already registered (by "
                         f"{ALGORITHMS[name].source!r})")
    presets = {k: dict(v) for k, v in getattr(source, "PRESETS", {}).items()}
    paper = tuple(getattr(source, "PAPER_PRESETS", ()))
    for preset, settings in presets.items():
        if preset in PRESETS:
            raise ValueError(f"preset {preset!r} of {name} is already taken")
        got = settings.get("algorithm", {}).get("name", name)
        if got != name:
            raise ValueError(f"preset {preset!r} of {name} selects algorithm {got!r}")
    unknown = sorted(set(paper) - set(presets))
    if unknown:
        raise ValueError(f"PAPER_PRESETS of {name} names presets it does not declare: {unknown}")

    statecodec.allow_later(lambda: _declare_state(source))
    algorithm = Algorithm(
        name=name, config=config, needs=source.needs, build_scheduler=source.build_scheduler,
        evaluations_per_iteration=source.evaluations_per_iteration,
        first_half_evaluations=getattr(source, "first_half_evaluations", _no_first_half),
        presets=presets, paper_presets=paper, source=source)
    ALGORITHMS[name] = algorithm
    for preset, settings in presets.items():
        algo = {"name": name, **settings.get("algorithm", {})}
        PRESETS[preset] = {**settings, "algorithm": algo}
    PAPER_PRESETS.extend(paper)
    for fn in _listeners:
        fn(algorithm)
    return algorithm


def get(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def configs() -> dict[str, type[AlgorithmSettings]]:
    """Each registered algorithm's settings class, by name."""
    return {n: a.config for n, a in ALGORITHMS.items()}


def unregister(name: str) -> None:
    """Removes an algorithm and its presets (a test's toy algorithm, when it is done)."""
    algorithm = ALGORITHMS.pop(name)
    for preset in algorithm.presets:
        PRESETS.pop(preset, None)
    PAPER_PRESETS[:] = [p for p in PAPER_PRESETS if p not in algorithm.presets]
    for fn in _listeners:
        fn(algorithm)
