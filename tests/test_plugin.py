"""An algorithm plugs in whole: a toy declared in this file alone (random search
around the best elite, with its own emitter) is registered, then configured,
built, run by the loop, checkpointed and resumed like any built-in algorithm."""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
import pytest
from pydantic import Field
from ribs.emitters import EmitterBase

from dqd_ray import algorithms
from dqd_ray.algorithms import AlgorithmSettings, MaskedScheduler, Needs
from dqd_ray.cli import main as cli_main
from dqd_ray.config import PRESETS, ConfigError, build_config
from dqd_ray.loop import Experiment, read_metrics
from dqd_ray.runtime.resources import evaluations_per_iteration
from dqd_ray.state import checkpoint as ckpt


class RandomSearchEmitter(EmitterBase):
    """Gaussian samples around the best elite (around x0 while the archive is empty)."""

    def __init__(self, archive, x0, sigma: float, batch_size: int, seed: int):
        super().__init__(archive, solution_dim=len(x0), bounds=None, lower_bounds=None,
                         upper_bounds=None)
        self._x0 = np.asarray(x0, archive.dtypes["solution"])
        self._sigma, self._batch_size = float(sigma), int(batch_size)
        self._rng = np.random.default_rng(seed)
        self.asked = 0  # plain state of the emitter: checkpointed and restored too

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def ask(self) -> np.ndarray:
        self.asked += 1
        centre = self._x0 if self.archive.empty else self.archive.best_elite["solution"]
        noise = self._rng.normal(scale=self._sigma, size=(self._batch_size, len(centre)))
        return (centre[None] + noise).astype(self.archive.dtypes["solution"])


class ToyRandomSearch:
    """Everything the toy algorithm declares (the attributes a module would have)."""

    class Config(AlgorithmSettings):
        name: Literal["toy_random_search"] = "toy_random_search"
        sigma: float = Field(0.05, gt=0)
        batch_size: int = Field(5, gt=0)

    @staticmethod
    def needs(cfg, measure_dim: int) -> Needs:
        return Needs()

    @staticmethod
    def evaluations_per_iteration(cfg, needs: Needs) -> int:
        return cfg.algorithm.batch_size

    @staticmethod
    def build_scheduler(cfg, ctx) -> MaskedScheduler:
        archive_seed, emitter_seed = ctx.seeds(2)
        archive = ctx.archive(archive_seed)
        return MaskedScheduler(archive, [RandomSearchEmitter(archive, ctx.x0, cfg.sigma,
                                                             cfg.batch_size, emitter_seed)])

    STATE_CLASSES = (RandomSearchEmitter,)
    PRESETS = {"toy_random_search_hopper": {
        "env": {"id": "QDHopperBulletEnv-v0", "episode_length": 30},
        "policy": {"hidden_sizes": [8]},
        "algorithm": {"batch_size": 4, "sigma": 0.2},
    }}


SETS = ["logging.progress_bar=false", "resources.torch_threads=1", "resources.envs_per_worker=2",
        "checkpoint.every=2", "seed=5"]


@pytest.fixture
def toy():
    entry = algorithms.register(ToyRandomSearch)
    try:
        yield entry
    finally:
        algorithms.unregister("toy_random_search")


def test_the_registry_feeds_config_presets_and_cli(toy, capsys):
    assert algorithms.register(ToyRandomSearch) is toy  # registering again: the same entry
    cfg = build_config("toy_random_search_hopper", sets=["algorithm.sigma=0.3"])
    assert isinstance(cfg.algorithm, ToyRandomSearch.Config)
    assert cfg.algorithm.sigma == 0.3 and cfg.algorithm.batch_size == 4
    assert not cfg.uses_td3 and not cfg.uses_es
    assert evaluations_per_iteration(cfg) == 4
    with pytest.raises(ConfigError, match="not a setting of algorithm toy_random_search"):
        build_config("toy_random_search_hopper", sets=["algorithm.lr=1"])
    assert cli_main(["config", "--preset", "toy_random_search_hopper"]) == 0
    assert "name: toy_random_search" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already registered"):
        class Other(ToyRandomSearch):
            pass
        algorithms.register(Other)


def test_unregistered_toy_is_unknown_again():
    assert "toy_random_search_hopper" not in PRESETS
    with pytest.raises(ConfigError, match="unknown algorithm"):
        build_config(sets=["algorithm.name=toy_random_search"])


@pytest.mark.slow
def test_toy_runs_through_build_and_the_loop_and_resumes_exactly(toy, tmp_path):
    cfg = build_config("toy_random_search_hopper", sets=[*SETS, "iterations=4"])
    full = Experiment.create(cfg, tmp_path / "full", backend="inprocess")
    summary = full.run()
    assert summary["final"]["iteration"] == 4
    metrics = read_metrics(tmp_path / "full")
    assert [m["evaluations"] for m in metrics] == [4, 8, 12, 16]
    assert metrics[-1]["num_elites"] > 0

    cut = build_config("toy_random_search_hopper", sets=[*SETS, "iterations=2"])
    Experiment.create(cut, tmp_path / "cut", backend="inprocess").run()
    Experiment.resume(tmp_path / "cut", ["iterations=4"], backend="inprocess").run()
    resumed = read_metrics(tmp_path / "cut")
    for key in ("evaluations", "env_steps", "qd_score", "num_elites", "best_fitness"):
        assert [m[key] for m in resumed] == [m[key] for m in metrics], key

    def final(run_dir):
        path, manifest = ckpt.latest_valid(run_dir / "checkpoints")
        assert manifest["iteration"] == 4
        return ckpt.load_checkpoint(path, manifest)
    a, b = final(tmp_path / "full"), final(tmp_path / "cut")
    # The toy emitter's own state went through the checkpoint (its class is on the
    # allowlist only because the toy declared it), and was restored on resume.
    tree = json.dumps(b["coordinator"]["tree"])
    assert "RandomSearchEmitter" in tree and '"asked": 4' in tree
    oa, ob = np.argsort(a["archive"]["index"]), np.argsort(b["archive"]["index"])
    for key in ("index", "objective", "measures", "solution"):
        np.testing.assert_array_equal(a["archive"][key][oa], b["archive"][key][ob])
