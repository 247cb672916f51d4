"""The algorithm modules, the paper's metrics, and checkpoints that never run code."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from dqd_ray.algorithms.map_elites import MapElitesConfig
from dqd_ray.bench.sphere import DomainEvaluator
from dqd_ray.config import TD3Config, build_config
from dqd_ray.envs import LinearProjection, env_metadata
from dqd_ray.loop import Experiment, read_metrics
from dqd_ray.roles.coordinator import Coordinator
from dqd_ray.roles.learner import Learner
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.replay import ReplayBuffer
from dqd_ray.roles.rollout import RolloutWorker
from dqd_ray.runtime import System
from dqd_ray.state import checkpoint as ckpt
from dqd_ray.state import statecodec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["env.episode_length=40", "td3.batch_size=32", "td3.critic_hidden_sizes=[32,32]",
        "td3.train_steps_per_iteration=5", "td3.jacobian_states=32", "td3.learning_starts=32",
        "td3.replay_capacity=20000", "resources.envs_per_worker=2",
        "resources.learner_mode=sync", "logging.progress_bar=false", "checkpoint.every=1",
        "metrics.robustness_episodes=2"]
PGA_TINY = ["algorithm.iso_batch_size=3", "algorithm.pg_batch_size=4", "algorithm.pg_steps=3",
            "algorithm.pg_states=16"]


# -- PGA-ME ------------------------------------------------------------------------------


def _filled_learner(seed: int = 0) -> tuple[Learner, ReplayBuffer, PolicySpec]:
    rng = np.random.default_rng(seed)
    spec = PolicySpec(4, 2, [16])
    replay = ReplayBuffer(4, 2, 2, 5000, seed=seed)
    n = 2000
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    # Fitness reward: prefer actions aligned with the first two observation features.
    reward = np.stack([(act * obs[:, :2]).sum(1), act[:, 0]], 1).astype(np.float32)
    replay.add({"obs": obs, "action": act, "reward": reward,
                "next_obs": rng.normal(size=(n, 4)).astype(np.float32),
                "terminated": np.ones(n, np.float32)})
    cfg = TD3Config(critic_hidden_sizes=[32, 32], batch_size=64, learning_starts=10)
    learner = Learner(spec, 2, cfg, replay, seed=seed)
    learner.train(300)
    return learner, replay, spec


def _mean_q1(learner: Learner, genomes: np.ndarray, states: np.ndarray) -> np.ndarray:
    ens = learner.ensemble
    with torch.no_grad():
        s = torch.as_tensor(states)
        act = ens.spec.forward_torch(torch.as_tensor(genomes), s)  # (G, S, A)
        x = torch.cat([s.unsqueeze(0).expand(len(genomes), -1, -1), act], -1)
        q1 = ens.critic(x.reshape(1, -1, x.shape[-1]), select=slice(0, 1))
    return q1.reshape(len(genomes), -1).mean(1).numpy()


def test_pg_variation_raises_the_fitness_critics_q_of_every_varied_elite():
    learner, replay, spec = _filled_learner()
    parents = np.stack([spec.init_genome(np.random.default_rng(i)) for i in range(6)])
    variants = learner.pg_variation(parents, steps=10, lr=0.001, num_states=256)
    assert variants.shape == parents.shape and variants.dtype == np.float32
    assert not np.allclose(variants, parents)
    held_out = replay.sample_states(2000, seed=123)
    before, after = _mean_q1(learner, parents, held_out), _mean_q1(learner, variants, held_out)
    assert (after > before).all(), (before, after)
    # The variation is the learner's only write: the critic itself is untouched.
    assert _mean_q1(learner, parents, held_out) == pytest.approx(before)


def test_pga_me_batch_holds_greedy_actor_and_variants_of_elites():
    cfg = build_config("pga_me", sets=TINY + PGA_TINY)
    system = System(cfg, "inprocess", torch_threads=1)
    try:
        first = system.iteration()  # empty archive: x0 + N(0, 0.02^2), nothing from the critic
        assert first["evaluations"] == 3 + 4 and "greedy_fitness" not in first
        coord = system.coordinator
        pg = coord.scheduler.emitters[1]
        parents_seen = []
        original = system.group.pg_variation

        def spy(genomes, *args):
            parents_seen.append(np.array(genomes))
            return original(genomes, *args)

        system.group.pg_variation = spy
        m = system.iteration()
        assert list(pg.greedy_rows) == [0] and list(pg.vary_rows) == [1, 2, 3]
        assert len(parents_seen) == 1 and parents_seen[0].shape == (3, system.spec.genome_dim)
        elites = {s.tobytes() for s in coord.archive.data("solution")}
        assert all(p.tobytes() in elites for p in parents_seen[0])  # parents are elites
        assert "greedy_fitness" in m and m["critic_updates"] == 5
    finally:
        system.close()


# -- MAP-Elites ------------------------------------------------------------------------------


def test_map_elites_never_touches_a_learner(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("MAP-Elites touched a learner")

    monkeypatch.setattr(Learner, "__init__", forbidden)
    cfg = build_config("map_elites", sets=TINY + ["algorithm.batch_size=6"])
    system = System(cfg, "inprocess")
    try:
        assert system.learners == [] and system.group is None
        for _ in range(3):
            m = system.iteration()
        assert m["evaluations"] == 18 and m["num_elites"] > 0 and m["critic_updates"] == 0
        assert system.coordinator.learner is None
    finally:
        system.close()


# -- metrics ---------------------------------------------------------------------------------


def test_normalized_qd_score_and_the_paper_metrics():
    cfg = build_config("map_elites", sets=TINY + ["algorithm.batch_size=6",
                                                  "metrics.robustness_every=2"])
    meta = env_metadata(cfg.env.id)
    system = System(cfg, "inprocess")
    try:
        ms = [system.iteration() for _ in range(3)]
    finally:
        system.close()
    m = ms[-1]
    cells = 6 ** 4
    assert meta.max_fitness == 2500.0
    assert m["norm_qd_score"] == pytest.approx(m["qd_score"] / (cells * (2500 + 374.702526595403)))
    assert m["qd_score_per_cell"] == pytest.approx(m["qd_score"] / cells)
    data = system.archive()
    assert m["worst_fitness"] == pytest.approx(float(data["objective"].min()))
    assert m["best_fitness"] == pytest.approx(float(data["objective"].max()))
    assert "mean_evaluation" in m and "restarts" in m
    # Robustness every 2 iterations: absent before, then a number.
    assert ms[0]["robustness"] is None and isinstance(ms[1]["robustness"], float)
    assert m["robustness_evaluations"] == 2  # not counted as evaluations
    assert m["evaluations"] == 18


def test_robustness_of_a_deterministic_domain_is_zero_and_reused_while_best_is_unchanged():
    domain = LinearProjection(10, "sphere")
    coord = Coordinator(solution_dim=10, x0=np.zeros(10), archive_dims=[10, 10],
                        archive_ranges=domain.measure_ranges, qd_offset=0.0,
                        algorithm=MapElitesConfig(sigma=0.5, batch_size=20),
                        evaluator=DomainEvaluator(domain), seed=0, dtype=np.float64,
                        robustness_every=1, robustness_episodes=3)
    used = []
    for _ in range(30):
        m = coord.iteration()
        assert m["robustness"] == pytest.approx(0.0, abs=1e-9)
        used.append(m["robustness_evaluations"])
    # Re-measured only when the best elite changed: fewer than 3 per iteration.
    assert 3 <= used[-1] < 3 * 30 and used[-1] % 3 == 0


def test_time_limit_done_marks_truncated_episodes_as_done():
    meta = env_metadata("QDHalfCheetahBulletEnv-v0")  # never terminates early
    spec = PolicySpec(meta.obs_dim, meta.act_dim, [8])
    genome = spec.init_genome(np.random.default_rng(0))[None]
    flags = {}
    for done in (False, True):
        w = RolloutWorker("QDHalfCheetahBulletEnv-v0", spec, episode_length=15,
                          time_limit_done=done)
        out = w.evaluate(genome, [3])
        w.close()
        term = np.concatenate([c["terminated"] for c in out["transitions"]])
        assert len(term) == 15 and not term[:-1].any()
        flags[done] = float(term[-1])
    assert flags == {False: 0.0, True: 1.0}


# -- checkpoints --------------------------------------------------------------------------


def _tiny_run(tmp_path, preset="map_elites", *extra):
    algo = ["algorithm.batch_size=6"] if preset == "map_elites" else []
    cfg = build_config(preset, sets=TINY + algo + ["iterations=2", *extra])
    out = tmp_path / "run"
    Experiment.create(cfg, out, backend="inprocess").run()
    return out


def _rewrite_manifest(path):
    manifest = json.loads((path / "manifest.json").read_text())
    for name in list(manifest["files"]):
        if not (path / name).exists():
            del manifest["files"][name]
    for f in path.iterdir():
        if f.name != "manifest.json" and f.suffix != ".pkl":  # a .pkl is refused by name
            manifest["files"][f.name] = {"bytes": f.stat().st_size,
                                         "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_checkpoint_files_hold_no_pickle(tmp_path):
    out = _tiny_run(tmp_path)
    path = ckpt.list_checkpoints(out / "checkpoints")[-1]
    names = {p.name for p in path.iterdir()}
    assert {"coordinator.json", "coordinator.npz", "archive.npz", "manifest.json"} <= names
    assert not [n for n in names if n.endswith(".pkl")]
    with np.load(path / "coordinator.npz", allow_pickle=False) as z:
        assert all(z[k].dtype.kind in "biuf" for k in z.files)


def test_crafted_checkpoint_is_refused_without_running_anything(tmp_path):
    out = _tiny_run(tmp_path)
    *older, path = ckpt.list_checkpoints(out / "checkpoints")
    for p in older:  # the crafted checkpoint is the only one: no fallback
        shutil.rmtree(p)
    marker = tmp_path / "pwned"
    tree = json.loads((path / "coordinator.json").read_text())
    # An object of a type outside the allowlist, with a command in its attributes.
    tree["__dict__"]["counters"] = {"__object__": "subprocess.Popen",
                                    "attrs": {"args": f"touch {marker}"}}
    (path / "coordinator.json").write_text(json.dumps(tree))
    # A pickle where the old format kept the scheduler: never read.
    import pickle

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    (path / "coordinator.pkl").write_bytes(pickle.dumps(Payload()))
    _rewrite_manifest(path)  # the manifest's sha256 values all match
    with pytest.raises(ckpt.CheckpointError, match="subprocess.Popen.*allowlist"):
        Experiment.resume(out, ["iterations=3"], backend="inprocess").run()
    assert not marker.exists()
    # An object array in the npz (a pickle inside numpy's format) is refused as well.
    tree["__dict__"]["counters"] = {"__dict__": {}}
    (path / "coordinator.json").write_text(json.dumps(tree))
    with np.load(path / "coordinator.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["a0"] = np.array([Payload()], dtype=object)
    np.savez(path / "coordinator.npz", **arrays)
    _rewrite_manifest(path)
    with pytest.raises(ckpt.CheckpointError, match="unreadable coordinator state"):
        Experiment.resume(out, ["iterations=3"], backend="inprocess").run()
    assert not marker.exists()


def test_statecodec_refuses_unknown_nodes_before_assigning_anything():
    domain = LinearProjection(6, "sphere")
    coord = Coordinator(solution_dim=6, x0=np.zeros(6), archive_dims=[4, 4],
                        archive_ranges=domain.measure_ranges, qd_offset=0.0,
                        algorithm=MapElitesConfig(batch_size=8), evaluator=DomainEvaluator(domain),
                        dtype=np.float64)
    coord.iteration()
    state = coord.state_dict()
    before = coord.metrics()
    bad = json.loads(json.dumps(state["tree"]))
    bad["__dict__"]["robustness"] = {"__code__": "print(1)"}
    with pytest.raises(statecodec.StateError, match="unknown state node kind"):
        coord.load_state_dict({"tree": bad, "arrays": state["arrays"]})
    assert coord.metrics() == before
    with pytest.raises(statecodec.StateError, match="not in the checkpoint allowlist"):
        statecodec.encode({"x": object.__new__(type("Foreign", (), {}))})


def test_coordinator_state_grows_with_elites_not_with_the_grid():
    """Same elites, a 100-cell grid and a 1,000,000-cell grid: same state size."""
    dim = 50
    sizes = {}
    for dims in ([10, 10], [1000, 1000]):
        domain = LinearProjection(dim, "sphere")
        coord = Coordinator(solution_dim=dim, x0=np.zeros(dim), archive_dims=dims,
                            archive_ranges=domain.measure_ranges, qd_offset=0.0,
                            algorithm=MapElitesConfig(sigma=0.5, batch_size=5),
                            evaluator=DomainEvaluator(domain), dtype=np.float64)
        coord.iteration()
        state = coord.state_dict()
        n = coord.metrics()["num_elites"]
        sizes[dims[0]] = (sum(a.nbytes for a in state["arrays"].values()), n)
    (small, n_small), (large, n_large) = sizes[10], sizes[1000]
    assert n_large >= n_small >= 1
    # Only the occupied cells are stored: KBs, not 1e6 cells x 50 x 8 bytes (400 MB).
    # What grows with the grid is its cell boundaries: 1001 + 1001 floats.
    boundaries = 8 * (1001 + 1001 - 11 - 11)
    assert large <= small + boundaries + (n_large - n_small) * (dim + 10) * 8
    assert large < 50_000


def test_metrics_are_rewritten_when_resuming_from_an_older_checkpoint(tmp_path):
    out = _tiny_run(tmp_path, "map_elites", "iterations=4", "checkpoint.keep=4")
    newest = ckpt.list_checkpoints(out / "checkpoints")[-1]
    blob = (newest / "coordinator.npz").read_bytes()
    (newest / "coordinator.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.warns(UserWarning, match="corrupted"):
        Experiment.resume(out, ["iterations=5"], backend="inprocess").run()
    assert [m["iteration"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert [json.loads(ln)["iteration"] for ln in
            (out / "metrics.abandoned.jsonl").read_text().splitlines()] == [4]


def test_in_process_placement_names_the_ray_only_settings_it_ignores(capsys):
    sets = TINY + ["algorithm.batch_size=4", "resources.pin_to_head=true",
                   "resources.rollout_resource=rollout", "resources.cpus_per_worker=2"]
    system = System(build_config("map_elites", sets=sets), "inprocess")
    system.close()
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "Ray placement settings" in ln)
    for name in ("resources.pin_to_head=True", "resources.rollout_resource='rollout'",
                 "resources.cpus_per_worker=2.0"):
        assert name in line
    assert "learner_resource" not in line  # left at its default: not named
    system = System(build_config("map_elites", sets=TINY + ["algorithm.batch_size=4"]),
                    "inprocess")
    system.close()
    assert "Ray placement settings" not in capsys.readouterr().out


# -- every algorithm: the archive holds what was evaluated ---------------------------------

PRESET_SETS = {
    "cma_mega_td3": ["algorithm.batch_size=4"], "cma_mega_td3_es": ["algorithm.batch_size=4"],
    "cma_mega_es": ["algorithm.batch_size=4"], "cma_maega_td3": ["algorithm.batch_size=4"],
    "pga_me": PGA_TINY, "map_elites": ["algorithm.batch_size=6"],
    "me_es": ["algorithm.num_pairs=3", "algorithm.consecutive_steps=2"],
    "cma_maega_td3_es": ["algorithm.batch_size=4"],
    "sep_cma_mae": ["algorithm.num_emitters=2", "algorithm.batch_size=4"],
    "lm_ma_mae": ["algorithm.num_emitters=2", "algorithm.batch_size=4"],
    "openai_mae": ["algorithm.num_emitters=2", "algorithm.batch_size=4"],
}


@pytest.mark.parametrize("preset", sorted(PRESET_SETS))
def test_every_archived_elite_replays_to_its_archived_fitness(preset):
    """Each elite keeps the env seed of its evaluation: replayed, it gives its
    archived fitness and measures. (PGA-ME once archived the parents of its PG
    variants with the variants' fitness; this catches any such mix-up.)"""
    from dqd_ray.config import PRESETS

    assert set(PRESET_SETS) == set(PRESETS)
    cfg = build_config(preset, sets=TINY + PRESET_SETS[preset] + [
        "es.num_samples=4", "metrics.robustness_every=0", "algorithm.x0_from_policy_init=true"])
    system = System(cfg, "inprocess", torch_threads=1)
    try:
        for _ in range(3):
            system.iteration()
        archive = system.archive()
        worker = system.workers[0]
        out = worker.evaluate(archive["solution"], archive["seed"], record=False)
    finally:
        system.close()
    assert len(archive["objective"]) >= 2
    np.testing.assert_allclose(out["fitness"], archive["objective"], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(out["measures"], archive["measures"], atol=1e-6)
