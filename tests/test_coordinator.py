"""The CMA-MEGA coordinator on exact-gradient domains and, end to end, on real
pybullet physics; and the rollout worker that evaluates policies."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dqd_ray.algorithms.cma_mega import CMAMEGAConfig as AlgorithmConfig
from dqd_ray.bench.sphere import DomainEvaluator, make_coordinator, run_map_elites
from dqd_ray.config import build_config
from dqd_ray.envs import LinearProjection
from dqd_ray.roles.coordinator import Coordinator
from dqd_ray.roles.es_gradients import ESGradient
from dqd_ray.roles.policy import PolicySpec
from dqd_ray.roles.rollout import RolloutWorker
from dqd_ray.runtime import System

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TIMING_KEYS = ("rollout_s", "gradient_s", "train_s", "iteration_s")


def comparable(metrics: dict) -> dict:
    """The metrics less the wall-clock timings (``*_s``: the coarse split and the
    ``phase_*_s`` phases), which no two runs share."""
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS and not k.endswith("_s")}


class RecordingEvaluator(DomainEvaluator):
    """The exact domain, remembering every batch it was asked to evaluate."""

    def __init__(self, domain):
        super().__init__(domain)
        self.calls: list[np.ndarray] = []

    def evaluate(self, genomes, seeds):
        self.calls.append(np.array(genomes))
        assert len(seeds) == len(genomes)
        return super().evaluate(genomes, seeds)


def small_coordinator(dim: int = 20, seed: int = 0, evaluator=None, exact=True, es=None,
                      **algo_kw) -> tuple[Coordinator, LinearProjection]:
    domain = LinearProjection(dim, "sphere")
    algo = AlgorithmConfig(num_emitters=1, batch_size=35, sigma0=10.0, lr=1.0,
                           insert_greedy=False, **algo_kw)
    coord = Coordinator(
        solution_dim=dim, x0=np.zeros(dim), archive_dims=[20, 20],
        archive_ranges=domain.measure_ranges, qd_offset=0.0, algorithm=algo,
        evaluator=evaluator or DomainEvaluator(domain),
        exact_jacobian=(lambda th: domain.evaluate(th)[2]) if exact else None,
        es=es, seed=seed, dtype=np.float64,
    )
    return coord, domain


# -- exact-gradient domain ----------------------------------------------------------


def test_iterations_increase_coverage():
    coord = make_coordinator(dim=20)
    coverages = [coord.iteration()["coverage"] for _ in range(30)]
    assert coverages[0] > 0
    assert all(b >= a for a, b in itertools.pairwise(coverages))  # never drops
    assert coverages[-1] > 3 * coverages[0]
    m = coord.metrics()
    assert m["iteration"] == 30
    assert m["evaluations"] == 30 * 36
    assert m["invalid"] == 0 and m["nonfinite_gradients"] == 0
    assert m["num_elites"] == len(coord.archive)


def test_ask_tell_order_is_respected():
    domain = LinearProjection(20, "sphere")
    ev = RecordingEvaluator(domain)
    coord, _ = small_coordinator(evaluator=ev)
    for it in range(5):
        theta = np.array(coord.scheduler.emitters[0]._grad_opt.theta)  # what ask_dqd gives
        coord.iteration()
        # The exact jacobian needs no episode: theta (ask_dqd, one per emitter)
        # is evaluated with its branches (ask), first.
        batch = ev.calls[it]
        assert batch.shape == (1 + 35, 20)
        np.testing.assert_array_equal(batch[0], theta)
        assert not np.any(np.all(batch[1:] == theta, axis=1))
    assert len(ev.calls) == 5
    # Every elite was evaluated by us, and its stored objective and measures are
    # those of its own solution: results were told in the order they were asked.
    evaluated = np.concatenate(ev.calls)
    data = coord.archive_arrays()
    assert len(data["solution"]) > 20
    for sol in data["solution"]:
        assert np.any(np.all(evaluated == sol, axis=1))
    f, m, _ = domain.evaluate(data["solution"])
    np.testing.assert_allclose(data["objective"], f, rtol=1e-12)
    np.testing.assert_allclose(data["measures"], m, rtol=1e-12)
    # pyribs refuses a tell out of order.
    with pytest.raises(RuntimeError):
        coord.scheduler.tell(np.zeros(35), np.zeros((35, 2)))


@pytest.mark.parametrize("gradients", ["exact", "es"])
def test_theta_evaluated_with_its_branches_gives_the_archive_of_tell_dqd(gradients,
                                                                      monkeypatch):
    # The same iterations with theta evaluated before the jacobian (tell_dqd,
    # pyribs' order of calls) and with its branches (tell_jacobian, then
    # tell_thetas before tell): this domain's episodes do not depend on when
    # they run, so every archive, emitter and metric must come out the same.
    def run(late: bool):
        from dqd_ray.algorithms.scheduler import MaskedScheduler

        if not late:
            monkeypatch.setattr(MaskedScheduler, "tells_jacobian_first", False)
        es = ESGradient(sigma=0.1, num_samples=8, seed=3) if gradients == "es" else None
        domain = LinearProjection(20, "sphere")
        ev = RecordingEvaluator(domain)
        coord, _ = small_coordinator(evaluator=ev, exact=gradients == "exact", es=es)
        metrics = [comparable(coord.iteration()) for _ in range(6)]
        monkeypatch.undo()
        return coord, ev, metrics

    (early, ev_early, m_early), (late, ev_late, m_late) = run(False), run(True)
    assert m_early == m_late
    first = 8 if gradients == "es" else 0
    assert [len(c) for c in ev_late.calls][:2] == ([first, 1 + 35] if first else [36, 36])
    assert [len(c) for c in ev_early.calls][:2] == [1 + first, 35]
    a, b = early.archive_arrays(), late.archive_arrays()
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    sa, sb = early.state_dict(), late.state_dict()
    assert sa["tree"] == sb["tree"]
    for k in sa["arrays"]:
        np.testing.assert_array_equal(sa["arrays"][k], sb["arrays"][k])


@pytest.mark.parametrize("gradients", ["exact", "es"])
def test_state_round_trip(gradients):
    def make():
        es = ESGradient(0.1, 20, seed=5) if gradients == "es" else None
        return small_coordinator(seed=3, exact=gradients == "exact", es=es)[0]

    coord = make()
    for _ in range(3):
        coord.iteration()
    state = coord.state_dict()
    # Plain JSON and numeric arrays: what a checkpoint stores.
    blob = {"tree": json.loads(json.dumps(state["tree"])), "arrays": state["arrays"]}
    assert all(a.dtype.kind in "biuf" for a in state["arrays"].values())
    expected = [comparable(coord.iteration()) for _ in range(3)]
    arrays = coord.archive_arrays()

    fresh = make()
    fresh.load_state_dict(blob)
    assert fresh.counters["iteration"] == 3
    got = [comparable(fresh.iteration()) for _ in range(3)]
    assert got == expected
    again = fresh.archive_arrays()
    order_a, order_b = np.argsort(arrays["index"]), np.argsort(again["index"])
    for key in ("solution", "objective", "measures", "index"):
        np.testing.assert_array_equal(again[key][order_b], arrays[key][order_a])
    # The restored state is independent of the original blob's later use.
    fresh2 = make()
    fresh2.load_state_dict(blob)
    assert comparable(fresh2.iteration()) == expected[0]


@pytest.mark.parametrize("dim", [20, 40])
def test_es_rows_of_the_coordinator_point_up_their_own_objectives(dim):
    """Through the coordinator (its evaluator, its perturbations, its row
    order): each ES row points up its objective's true gradient, and a small
    step along it raises that objective."""
    es = ESGradient(sigma=0.05, num_samples=400, seed=1)
    coord, domain = small_coordinator(dim=dim, exact=False, es=es)
    thetas = np.random.default_rng(2).normal(0, 1.0, (3, dim))
    jac = coord.jacobian(thetas)
    assert jac.shape == (3, 3, dim)
    assert coord.counters["evaluations"] == 3 * 400  # the ES samples went through the evaluator
    obj0, meas0, true = domain.evaluate(thetas)
    values0 = np.concatenate([obj0[:, None], meas0], axis=1)
    for row in range(3):
        unit = jac[:, row] / np.linalg.norm(jac[:, row], axis=1, keepdims=True)
        true_unit = true[:, row] / np.linalg.norm(true[:, row], axis=1, keepdims=True)
        cos = (unit * true_unit).sum(axis=1)
        assert np.all(cos > 0.6), (row, cos)
        obj1, meas1, _ = domain.evaluate(thetas + 0.05 * unit)
        values1 = np.concatenate([obj1[:, None], meas1], axis=1)
        assert np.all(values1[:, row] > values0[:, row]), row


def test_same_seed_same_run_other_seed_other_run():
    runs = []
    for seed in (3, 3, 4):
        coord, _ = small_coordinator(seed=seed)
        metrics = [comparable(coord.iteration()) for _ in range(3)]
        runs.append((metrics, coord.archive_arrays()))
    (ma, a), (mb, b), (mc, c) = runs
    assert ma == mb
    for key in ("index", "objective", "solution"):
        np.testing.assert_array_equal(a[key], b[key])
    assert ma[-1]["qd_score"] != mc[-1]["qd_score"]


def test_iteration_metrics_agree_with_the_archive_and_the_work_done():
    recorder_domain = LinearProjection(20, "sphere")
    recorder = RecordingEvaluator(recorder_domain)
    coord, domain = small_coordinator(evaluator=recorder)
    history = [coord.iteration() for _ in range(3)]
    m = history[-1]
    data = coord.archive_arrays()
    assert [h["iteration_evaluations"] for h in history] == [1 + 35] * 3
    assert m["evaluations"] == 3 * 36 == sum(len(c) for c in recorder.calls)
    assert m["iteration_env_steps"] == 0 and m["iteration"] == 3
    assert m["num_elites"] == len(data["index"])
    assert m["best_fitness"] == pytest.approx(data["objective"].max())
    assert m["mean_fitness"] == pytest.approx(data["objective"].mean())
    assert m["qd_score"] == pytest.approx(data["objective"].sum())  # offset 0
    for h in history:
        assert 0 <= h["rollout_s"] <= h["iteration_s"] and 0 <= h["gradient_s"] <= h["iteration_s"]
        assert h["rollout_s"] + h["gradient_s"] + h["train_s"] <= h["iteration_s"]
    thetas = recorder.calls[-1][:1]  # the last theta (one emitter), first of its batch
    norms = np.linalg.norm(domain.evaluate(thetas)[2], axis=2)
    assert m["grad_norm_fitness"] == pytest.approx(norms[:, 0].mean())
    assert m["grad_norm_measures"] == pytest.approx(norms[:, 1:].mean())


def test_sphere_beats_map_elites():
    iterations = 500
    coord = make_coordinator(dim=100, seed=0)
    for _ in range(iterations):
        m = coord.iteration()
    assert m["evaluations"] == 36 * iterations
    me = run_map_elites(100, m["evaluations"], seed=0)
    # Measured: CMA-MEGA ~58% coverage / norm QD ~47; MAP-Elites ~9% / ~8.
    assert m["coverage"] > 0.35
    assert m["coverage"] > 3 * me["coverage"]
    assert m["qd_score_per_cell"] > 3 * me["norm_qd_score"]


class FlakyEvaluator(DomainEvaluator):
    """Flags solutions invalid by a rule on their coordinates.

    x[0] > 1: valid=False with NaN fitness and measures (a faulty rollout);
    x[1] > 1 (otherwise): valid=True but NaN fitness (the coordinator must
    catch it); x[2] > 1.5 (otherwise): infinite measure.
    """

    def __init__(self, domain):
        super().__init__(domain)
        self.bad = 0
        self.total = 0

    def evaluate(self, genomes, seeds):
        out = super().evaluate(genomes, seeds)
        g = np.asarray(genomes)
        a = g[:, 0] > 1.0
        b = ~a & (g[:, 1] > 1.0)
        c = ~a & ~b & (g[:, 2] > 1.5)
        out["valid"][a] = False
        out["fitness"][a] = np.nan
        out["measures"][a] = np.nan
        out["fitness"][b] = np.nan
        out["measures"][c, 1] = np.inf
        self.bad += int((a | b | c).sum())
        self.total += len(g)
        return out


def is_flagged(sol: np.ndarray) -> np.ndarray:
    return (sol[:, 0] > 1.0) | (sol[:, 1] > 1.0) | (sol[:, 2] > 1.5)


@pytest.mark.parametrize("gradients", ["exact", "es"])
def test_invalid_solutions_never_reach_the_archive(gradients):
    domain = LinearProjection(20, "sphere")
    ev = FlakyEvaluator(domain)
    es = ESGradient(0.5, 10, seed=0) if gradients == "es" else None
    coord, _ = small_coordinator(evaluator=ev, exact=gradients == "exact", es=es)
    for _ in range(15):
        m = coord.iteration()
    assert ev.bad > 20 and ev.bad < ev.total  # the rule really bites, not everywhere
    assert m["invalid"] == ev.bad
    assert m["evaluations"] == ev.total
    assert m["nonfinite_gradients"] == 0
    data = coord.archive_arrays()
    assert len(data["objective"]) > 10
    assert np.all(np.isfinite(data["objective"]))
    assert np.all(np.isfinite(data["measures"]))
    assert not np.any(is_flagged(data["solution"]))
    # Stored values are those of the solutions themselves.
    f, meas, _ = domain.evaluate(data["solution"])
    np.testing.assert_allclose(data["objective"], f, rtol=1e-12)
    np.testing.assert_allclose(data["measures"], meas, rtol=1e-12)
    assert np.isfinite(m["qd_score"])


def test_all_invalid_batches_on_an_empty_archive():
    """Whole invalid batches before anything is in the archive insert nothing and
    do not crash (a no-improvement restart would sample the empty archive)."""

    class SwitchableEvaluator(DomainEvaluator):
        broken = True

        def evaluate(self, genomes, seeds):
            out = super().evaluate(genomes, seeds)
            if self.broken:
                out["valid"][:] = False
                out["fitness"][:] = np.nan
            return out

    domain = LinearProjection(20, "sphere")
    ev = SwitchableEvaluator(domain)
    coord, _ = small_coordinator(evaluator=ev)
    for i in range(2):
        m = coord.iteration()
        assert m["invalid"] == 36 * (i + 1) and m["num_elites"] == 0
    assert len(coord.archive) == 0
    assert m["restarts"] == 0
    ev.broken = False
    m = coord.iteration()
    assert m["invalid"] == 72 and m["num_elites"] > 0
    assert np.all(np.isfinite(coord.archive_arrays()["objective"]))


def test_nonfinite_gradient_rows_are_zeroed_and_counted():
    domain = LinearProjection(20, "sphere")
    seen = []

    def bad_jacobian(thetas):
        jac = domain.evaluate(thetas)[2]
        jac[:, 1, 3] = np.nan  # measure 1's row is broken
        jac[:, 2, 12] = np.inf  # and so is measure 2's
        seen.append(len(thetas))
        return jac

    algo = AlgorithmConfig(num_emitters=2, batch_size=10, sigma0=1.0, insert_greedy=False)
    coord = Coordinator(
        solution_dim=20, x0=np.zeros(20), archive_dims=[20, 20],
        archive_ranges=domain.measure_ranges, qd_offset=0.0, algorithm=algo,
        evaluator=DomainEvaluator(domain), exact_jacobian=bad_jacobian, seed=0,
        dtype=np.float64,
    )
    for _ in range(4):
        m = coord.iteration()
    assert seen == [2] * 4
    assert m["nonfinite_gradients"] == 4 * 2 * 2  # iterations x thetas x bad rows
    assert np.isfinite(m["grad_norm_fitness"]) and m["grad_norm_measures"] == 0.0
    data = coord.archive_arrays()
    assert len(data["solution"]) > 0 and np.all(np.isfinite(data["solution"]))
    # With zero measure gradients every branch is theta + c0 * grad f: the
    # solutions stay on the line from theta toward the optimum.
    direction = domain.optimum / np.linalg.norm(domain.optimum)
    assert np.allclose(data["solution"] - np.outer(data["solution"] @ direction, direction),
                       0.0, atol=1e-8)


def test_missing_gradient_source_rejected():
    domain = LinearProjection(20, "sphere")
    with pytest.raises(ValueError, match="gradient source"):
        Coordinator(solution_dim=20, x0=np.zeros(20), archive_dims=[5, 5],
                    archive_ranges=domain.measure_ranges, qd_offset=0.0,
                    algorithm=AlgorithmConfig(), evaluator=DomainEvaluator(domain))


# -- in process, real physics ------------------------------------------------------

def run_in_process(cfg, iterations):
    system = System(cfg, placement="inprocess")
    try:
        return system, [system.iteration() for _ in range(iterations)]
    finally:
        system.close()


SMALL = ["env.episode_length=100", "algorithm.batch_size=8",
         "td3.train_steps_per_iteration=20", "td3.batch_size=64", "td3.replay_capacity=20000",
         "resources.envs_per_worker=4", "td3.jacobian_states=64", "resources.learner_mode=sync"]


def test_in_process_cma_mega_td3_on_ant():
    cfg = build_config("cma_mega_td3", sets=SMALL)
    system, history = run_in_process(cfg, 6)
    first, last = history[0], history[-1]
    assert last["iteration"] == 6
    assert last["num_elites"] > first["num_elites"] > 0
    elites = [m["num_elites"] for m in history]
    assert all(b >= a for a, b in itertools.pairwise(elites))
    assert last["evaluations"] == 6 * (1 + 8 + 1)  # theta, branches, greedy actor
    assert last["invalid"] == 0 and last["nonfinite_gradients"] == 0
    # Every env step became a transition.
    assert system.replay.total_added == last["env_steps"] > 0
    # Critics train from iteration 2 (the buffer is empty before the first rollouts).
    assert "critic_loss" not in first
    losses = [m["critic_loss"] for m in history if "critic_loss" in m]
    assert len(losses) == 5 and last["critic_updates"] == 5 * 20
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses
    assert len(last["critic_loss_per_objective"]) == 5  # fitness + 4 feet
    # The cumulative counter, in the metrics and on the coordinator.
    assert last["greedy_inserted"] == system.coordinator.counters["greedy_inserted"] > 0
    assert sum(m.get("greedy_inserted_this_iteration", False) for m in history) \
        == last["greedy_inserted"]
    assert all(np.isfinite(m["greedy_fitness"]) for m in history)
    assert np.isfinite(last["grad_norm_fitness"]) and last["grad_norm_fitness"] > 0
    data = system.coordinator.archive_arrays()
    assert data["solution"].shape == (last["num_elites"], system.spec.genome_dim)
    assert np.all(np.isfinite(data["objective"]))
    assert np.all((data["measures"] >= 0) & (data["measures"] <= 1))


@pytest.mark.parametrize("preset", ["cma_mega_td3_es", "cma_mega_es"])
def test_in_process_es_presets_smoke(preset):
    cfg = build_config(preset, sets=SMALL + ["es.num_samples=10"])
    system, history = run_in_process(cfg, 2)
    last = history[-1]
    coord = system.coordinator
    if preset == "cma_mega_es":
        assert system.learners == [] and coord.es_rows == [0, 1, 2, 3, 4]
        per_iteration = 1 + 10 + 8  # theta, ES samples, branches
    else:
        assert system.splits == [[0]] and coord.es_rows == [1, 2, 3, 4]
        per_iteration = 1 + 10 + 8 + 1  # ... and the greedy actor
    assert last["evaluations"] == 2 * per_iteration
    assert last["num_elites"] > 0 and last["nonfinite_gradients"] == 0
    assert last["grad_norm_measures"] > 0
    assert system.replay.total_added == last["env_steps"]


def test_in_process_cma_maega_smoke():
    cfg = build_config("cma_maega_td3", sets=SMALL)
    system, history = run_in_process(cfg, 2)
    coord = system.coordinator
    assert coord.archive.learning_rate < 1
    assert coord.archive.learning_rate == pytest.approx(cfg.algorithm.archive_learning_rate)
    assert coord.result_archive is not coord.archive
    assert coord.result_archive.learning_rate == 1.0
    # Metrics come from the result archive, which holds real objectives.
    assert history[-1]["num_elites"] == len(coord.result_archive) > 0
    data = coord.archive_arrays()
    assert np.all(np.isfinite(data["objective"]))


# -- rollout worker -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hopper_worker():
    w = RolloutWorker("QDHopperBulletEnv-v0", num_envs=3, episode_length=200, chunk_size=64,
                      hidden_sizes=(16, 16))
    yield w
    w.close()


def hopper_genomes(spec: PolicySpec, n: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([spec.init_genome(rng) for _ in range(n)])


def test_rollout_shapes_and_determinism(hopper_worker):
    w = hopper_worker
    genomes = hopper_genomes(w.spec)
    seeds = np.arange(10, 15)
    out = w.evaluate(genomes, seeds)
    assert out["fitness"].shape == (5,)
    assert out["measures"].shape == (5, 1)
    assert out["length"].shape == (5,) and out["valid"].dtype == bool
    assert out["valid"].all()
    assert np.all((out["length"] > 0) & (out["length"] <= 200))
    assert out["env_steps"] == out["length"].sum()
    assert np.all((out["measures"] >= 0) & (out["measures"] <= 1))
    chunks = out["transitions"]
    assert all(len(c["obs"]) <= 64 for c in chunks)
    assert sum(len(c["obs"]) for c in chunks) == out["env_steps"]

    again = w.evaluate(genomes, seeds)
    np.testing.assert_array_equal(again["fitness"], out["fitness"])
    np.testing.assert_array_equal(again["measures"], out["measures"])
    np.testing.assert_array_equal(again["length"], out["length"])
    # Independent of how many envs run in lockstep.
    single = RolloutWorker("QDHopperBulletEnv-v0", w.spec, num_envs=1, episode_length=200)
    try:
        one = single.evaluate(genomes, seeds, record=False)
    finally:
        single.close()
    np.testing.assert_array_equal(one["fitness"], out["fitness"])
    assert one["transitions"] == []
    # Other seeds give other episodes.
    other = w.evaluate(genomes, seeds + 100, record=False)
    assert not np.array_equal(other["fitness"], out["fitness"])


def test_rollout_argument_checks(hopper_worker):
    genomes = hopper_genomes(hopper_worker.spec, 2)
    with pytest.raises(ValueError, match="seed"):
        hopper_worker.evaluate(genomes, [1])
    with pytest.raises(ValueError):
        hopper_worker.evaluate(genomes[:, :-1], [1, 2])
    with pytest.raises(ValueError):
        RolloutWorker("QDHopperBulletEnv-v0", num_envs=0)


def mid_episode_fault_genome(spec: PolicySpec) -> np.ndarray:
    """Zero actions until the torso has dropped ~3 cm, then NaN.

    hidden1 = relu(-100 z_rel); hidden2 = relu(1e38 hidden1) twice; action 0 =
    hidden2_a - hidden2_b: exactly 0 while finite, inf - inf = NaN on overflow.
    """
    (w1, b1), (w2, b2), (w3, b3) = [(w.copy(), b.copy()) for w, b in
                                    spec.unflatten(np.zeros(spec.genome_dim, np.float32))]
    w1[0, 0] = -100.0
    w2[:, 0] = 1e38
    w3[0, :] = [1.0, -1.0]
    return spec.flatten([(w1, b1), (w2, b2), (w3, b3)])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_faulty_genomes_are_invalid_and_stop_recording():
    spec = PolicySpec(15, 3, [1, 2], "relu")
    zero = np.zeros(spec.genome_dim, np.float32)
    nan = np.full(spec.genome_dim, np.nan, np.float32)
    fault = mid_episode_fault_genome(spec)
    genomes = np.stack([zero, nan, fault, zero])
    w = RolloutWorker("QDHopperBulletEnv-v0", spec, num_envs=1, episode_length=200,
                      chunk_size=1000)
    try:
        out = w.evaluate(genomes, [0, 0, 0, 0])
    finally:
        w.close()
    np.testing.assert_array_equal(out["valid"], [True, False, False, True])
    assert np.isnan(out["fitness"][1]) and np.isnan(out["fitness"][2])
    assert np.all(np.isnan(out["measures"][[1, 2]]))
    assert np.all(np.isfinite(out["fitness"][[0, 3]]))
    assert out["fitness"][0] == out["fitness"][3]
    length = out["length"]
    assert length[1] == 0  # NaN from the first action: no step at all
    assert 0 < length[2] < length[0]  # faults mid-episode, before the fall ends it
    chunk = {k: np.concatenate([c[k] for c in out["transitions"]]) for k in
             out["transitions"][0]}
    # Transitions: the zero genome's episode, the faulty genome's steps up to
    # its fault, the second zero episode; nothing after the fault.
    assert len(chunk["obs"]) == length[0] + length[2] + length[3] == out["env_steps"]
    assert np.all(np.isfinite(chunk["action"])) and np.all(np.isfinite(chunk["next_obs"]))
    seg = slice(length[0], length[0] + length[2])
    assert np.all(chunk["action"][seg] == 0.0)
    assert np.all(chunk["terminated"][seg] == 0.0)
    # The last recorded state of the faulty genome is the one before its NaN action.
    assert chunk["next_obs"][seg][-1, 0] < -0.034 <= chunk["obs"][seg][-1, 0]


def split_episodes(chunk: dict, lengths) -> list[dict]:
    out, pos = [], 0
    for n in lengths:
        out.append({k: v[pos:pos + n] for k, v in chunk.items()})
        pos += n
    assert pos == len(chunk["obs"])
    return out


def test_transitions_terminated_only_at_real_ends():
    spec = PolicySpec(15, 3, [16, 16])
    genomes = hopper_genomes(spec)
    w = RolloutWorker("QDHopperBulletEnv-v0", spec, num_envs=1, episode_length=200,
                      chunk_size=50)
    try:
        out = w.evaluate(genomes, np.arange(5))
    finally:
        w.close()
    chunk = {k: np.concatenate([c[k] for c in out["transitions"]]) for k in
             out["transitions"][0]}
    assert chunk["reward"].shape == (out["env_steps"], 2)  # fitness + 1 foot
    assert np.all(out["length"] < 200)  # random hoppers fall: real terminations
    for i, ep in enumerate(split_episodes(chunk, out["length"])):
        term = ep["terminated"]
        assert term[-1] == 1.0 and np.all(term[:-1] == 0.0)
        # A contiguous episode: each next_obs is the following obs.
        np.testing.assert_array_equal(ep["next_obs"][:-1], ep["obs"][1:])
        # Rewards add up to the fitness; the measure column to the measure.
        assert ep["reward"][:, 0].sum() == pytest.approx(out["fitness"][i], rel=1e-4, abs=1e-3)
        assert set(np.unique(ep["reward"][:, 1])) <= {0.0, 1.0}
        assert ep["reward"][:, 1].mean() == pytest.approx(out["measures"][i, 0], abs=1e-6)


def test_transitions_lockstep_counts(hopper_worker):
    out = hopper_worker.evaluate(hopper_genomes(hopper_worker.spec), np.arange(5))
    chunk = {k: np.concatenate([c[k] for c in out["transitions"]]) for k in
             out["transitions"][0]}
    assert len(chunk["obs"]) == out["length"].sum()
    assert chunk["terminated"].sum() == np.sum(out["length"] < 200)
    assert set(np.unique(chunk["terminated"])) <= {0.0, 1.0}


def test_truncated_episodes_never_terminate():
    w = RolloutWorker("QDHalfCheetahBulletEnv-v0", num_envs=2, episode_length=50,
                      hidden_sizes=(16,))
    try:
        genomes = np.stack([w.spec.init_genome(np.random.default_rng(i)) for i in range(3)])
        out = w.evaluate(genomes, [1, 2, 3])
    finally:
        w.close()
    assert out["valid"].all()
    np.testing.assert_array_equal(out["length"], [50, 50, 50])
    chunk = {k: np.concatenate([c[k] for c in out["transitions"]]) for k in
             out["transitions"][0]}
    assert len(chunk["obs"]) == 150
    assert np.all(chunk["terminated"] == 0.0)
    assert chunk["reward"].shape == (150, 3)  # fitness + front foot + back foot
    assert set(np.unique(chunk["reward"][:, 1:])) <= {0.0, 1.0}
    assert chunk["obs"].dtype == np.float32 and chunk["action"].shape == (150, 6)
    assert np.all(np.abs(chunk["action"]) <= 1.0)


def test_sink_receives_chunks():
    from dqd_ray.roles.replay import ReplayBuffer

    spec = PolicySpec(15, 3, [8])
    buf = ReplayBuffer(15, 3, 2, capacity=10_000, seed=0)
    w = RolloutWorker("QDHopperBulletEnv-v0", spec, num_envs=2, episode_length=60,
                      chunk_size=16, sink=buf.add)
    try:
        out = w.evaluate(hopper_genomes(spec, 4), np.arange(4))
    finally:
        w.close()
    assert out["transitions"] == []
    assert len(buf) == buf.total_added == out["env_steps"]
    assert w.total_env_steps == out["env_steps"]


def test_keyed_transitions_do_not_depend_on_lockstep_scheduling():
    from dqd_ray.roles.replay import ReplayBuffer

    spec = PolicySpec(15, 3, [16, 16])
    genomes = hopper_genomes(spec)
    seeds = np.arange(5)
    # Reference: one env runs the genomes one after the other.
    ref = RolloutWorker("QDHopperBulletEnv-v0", spec, num_envs=1, episode_length=200)
    try:
        out_ref = ref.evaluate(genomes, seeds)
    finally:
        ref.close()
    expected = {k: np.concatenate([c[k] for c in out_ref["transitions"]])
                for k in out_ref["transitions"][0]}

    buf = ReplayBuffer(15, 3, 2, capacity=10_000, seed=0)
    w = RolloutWorker("QDHopperBulletEnv-v0", spec, num_envs=3, episode_length=200,
                      chunk_size=16, sink=buf.add)
    try:
        out = w.evaluate(genomes, seeds, keys=[(7, i) for i in range(5)])
        assert len(buf) == 0  # staged until committed
        buf.commit()
        w.set_sink(None)
        unsunk = w.evaluate(genomes, seeds, keys=list(range(5)))  # keys without a sink
    finally:
        w.close()
    np.testing.assert_array_equal(out["fitness"], out_ref["fitness"])
    assert len(buf) == out["env_steps"] == len(expected["obs"])
    for k, v in expected.items():
        np.testing.assert_array_equal(buf._data[k][:len(buf)], v)
    # Without a sink keyed chunks come back, one genome per chunk.
    assert sum(len(c["obs"]) for c in unsunk["transitions"]) == out["env_steps"]
    assert len(unsunk["transitions"]) >= 5


def test_a_held_commit_enters_the_buffer_with_the_next_call_in_call_order():
    # The coordinator holds the first half's transitions (the ES samples) until
    # the iteration's end: the jacobian then sees the experience up to the
    # previous iteration; both halves then enter the buffer, the first first.
    from dqd_ray.roles.replay import ReplayBuffer
    from dqd_ray.runtime.evaluator import PooledEvaluator
    from dqd_ray.runtime.placement import InProcess

    spec = PolicySpec(15, 3, [16, 16])
    genomes = hopper_genomes(spec, 6)
    seeds = np.arange(6)
    p = InProcess()

    def evaluator():
        buf = ReplayBuffer(15, 3, 2, capacity=10_000, seed=0)
        w = RolloutWorker("QDHopperBulletEnv-v0", spec, num_envs=2, episode_length=60,
                          sink=p.sink(buf))
        return PooledEvaluator(p, [w], buf, keyed=True), buf, w

    plain, buf_plain, w1 = evaluator()
    held, buf_held, w2 = evaluator()
    drawn = []
    try:
        plain.evaluate(genomes[:3], seeds[:3])
        plain.evaluate(genomes[3:], seeds[3:])
        held.before_commit = lambda: drawn.append(len(buf_held))
        held.hold_commit()
        first = held.evaluate(genomes[:3], seeds[:3])
        assert len(buf_held) == 0 and drawn == []  # held: nothing entered, no hook yet
        second = held.evaluate(genomes[3:], seeds[3:])
    finally:
        w1.close()
        w2.close()
    assert drawn == [0]  # the hook ran once, before the commit
    assert len(buf_held) == len(buf_plain) == first["env_steps"] + second["env_steps"] > 0
    for k in buf_plain._data:
        np.testing.assert_array_equal(buf_held._data[k], buf_plain._data[k])
