"""A checkpoint loader that refuses, quickly, what it does not expect.

Each crafted checkpoint below starts from a real one (a tiny in-process
CMA-MEGA (TD3) run that saves its replay buffer), and its manifest's sizes and
sha256 values are then fixed to match the crafted files (following symlinks,
as a loader that trusts them would), so that only the loader's own checks can
stop it. Each must be refused with a :class:`CheckpointError` naming the file
and the problem, in well under a second. Where the refusal concerns the
coordinator's state, the state is also given to a freshly built coordinator
(``Coordinator.load_state_dict``, through :mod:`dqd_ray.state.statecodec`), which
must refuse it without changing anything; the untouched state loads there,
so no check here is vacuous.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dqd_ray.config import build_config
from dqd_ray.loop import Experiment
from dqd_ray.runtime import System
from dqd_ray.state import checkpoint as ckpt
from dqd_ray.state import statecodec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["env.episode_length=40", "algorithm.batch_size=4", "td3.batch_size=32",
        "td3.critic_hidden_sizes=[32,32]", "td3.train_steps_per_iteration=5",
        "td3.jacobian_states=32", "td3.learning_starts=32", "td3.replay_capacity=2000",
        "resources.envs_per_worker=2", "resources.learner_mode=sync",
        "logging.progress_bar=false", "logging.final_gif=false", "iterations=2",
        "checkpoint.every=1", "checkpoint.keep=3", "checkpoint.save_replay=true"]
FAST = 1.0  # seconds: every refusal, measured after the modules are imported
SCHED = ("__dict__", "scheduler", "attrs")


def tiny():
    return build_config("cma_mega_td3", sets=TINY)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A finished 2-iteration run with checkpoints 1 and 2 (each with replay)."""
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    Experiment.create(tiny(), run_dir, backend="inprocess").run()
    newest = ckpt.list_checkpoints(run_dir / "checkpoints")[-1]
    ckpt.load_checkpoint(newest, ckpt.verify(newest))  # imports done before any timing
    return run_dir


@pytest.fixture(scope="module")
def coordinator(source):
    """The coordinator of a freshly built system of the same config (what a
    resume restores onto). Every refusal below leaves it unchanged, so it stays
    fresh for the next test."""
    system = System(tiny(), "inprocess", torch_threads=1)
    yield system.coordinator
    system.close()


def copy_run(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run and its newest checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(source, run, symlinks=True)
    return run, ckpt.list_checkpoints(run / "checkpoints")[-1]


def refit(path: Path, **given: dict) -> None:
    """Sets every listed file's size and sha256 to what a trusting loader
    would find (symlinks followed); ``given`` overrides entries by name."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in list(manifest["files"]):
        if name in given:
            manifest["files"][name] = given[name]
        else:
            data = (path / name).read_bytes()
            manifest["files"][name] = {"bytes": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))


def name_in_manifest(path: Path, name: str, entry: dict) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = entry
    (path / "manifest.json").write_text(json.dumps(manifest))


def tree_of(path: Path) -> dict:
    return json.loads((path / "coordinator.json").read_text())


def arrays_of(path: Path, name: str = "coordinator.npz") -> dict[str, np.ndarray]:
    with np.load(path / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def big_array(path: Path) -> str:
    """The largest array coordinator.npz holds (the emitter's jacobian batch)."""
    with zipfile.ZipFile(path / "coordinator.npz") as zf:
        return max(zf.infolist(), key=lambda i: i.file_size).filename[:-4]


def unshare(path: Path) -> None:
    """Lays the checkpoint out as format version 3 did: the coordinator's tree
    holds its own copy of each array it names in archive.npz (so that a test
    can craft the coordinator's archive apart from archive.npz)."""
    tree, arrays, archive = tree_of(path), arrays_of(path), arrays_of(path, "archive.npz")

    def own(node):
        if isinstance(node, list):
            return [own(v) for v in node]
        if not isinstance(node, dict):
            return node
        key = node.get("__array__")
        if isinstance(key, str) and key.startswith(ckpt.SHARED):
            copy = f"s{len(arrays)}"
            arrays[copy] = archive[key.removeprefix(ckpt.SHARED)]
            return {**node, "__array__": copy}
        return {k: own(v) for k, v in node.items()}

    (path / "coordinator.json").write_text(json.dumps(own(tree)))
    np.savez(path / "coordinator.npz", **arrays)
    refit(path)


def plant_batch(path: Path) -> str:
    """Puts a batch of solutions back where format version 3 kept it (the
    scheduler's ``_cur_solutions``: a loader still meets it in old checkpoints
    and in crafted ones); returns its array's key."""
    tree, arrays = tree_of(path), arrays_of(path)
    key = "batch"
    arrays[key] = np.zeros((4, 21256))
    tree[SCHED[0]][SCHED[1]][SCHED[2]]["_cur_solutions"] = {"__array__": key}
    (path / "coordinator.json").write_text(json.dumps(tree))
    np.savez(path / "coordinator.npz", **arrays)
    refit(path)
    return key


def load(path: Path) -> dict:
    """What resume does with a checkpoint: verify, then load."""
    return ckpt.load_checkpoint(path, ckpt.verify(path))


def refused(fn, *parts: str) -> str:
    """Runs ``fn``; it must raise a CheckpointError naming every part, fast."""
    t0 = time.perf_counter()
    with pytest.raises(ckpt.CheckpointError) as info:
        fn()
    took = time.perf_counter() - t0
    msg = str(info.value)
    print(f"\nrefused in {took * 1000:.1f} ms: {msg}")
    assert took < FAST, (took, msg)
    for part in parts:
        assert part in msg, (part, msg)
    return msg


def fingerprint(coord) -> str:
    state = coord.state_dict()
    h = hashlib.sha256(json.dumps(state["tree"], sort_keys=True).encode())
    for k in sorted(state["arrays"]):
        h.update(k.encode() + state["arrays"][k].tobytes())
    return h.hexdigest()


def restore_refused(coord, path: Path, tree: dict, arrays: dict, *parts: str) -> str:
    """The live coordinator refuses the state, changes nothing, and the error
    the loop reports names the file."""
    before = fingerprint(coord)
    t0 = time.perf_counter()
    with pytest.raises(statecodec.StateError) as info:
        coord.load_state_dict({"tree": tree, "arrays": arrays})
    took = time.perf_counter() - t0
    assert took < FAST
    assert fingerprint(coord) == before
    msg = str(ckpt.restore_refusal(path, info.value))
    print(f"\nrestore refused in {took * 1000:.1f} ms: {msg}")
    for part in ("coordinator.json", *parts):
        assert part in msg, (part, msg)
    return msg


# -- the legitimate checkpoint -------------------------------------------------------


def test_a_legit_checkpoint_loads_and_restores(source):
    newest = ckpt.list_checkpoints(source / "checkpoints")[-1]
    t0 = time.perf_counter()
    state = load(newest)
    assert time.perf_counter() - t0 < 5 * FAST
    assert set(state) == {"coordinator", "learners", "extra", "archive", "replay"}
    assert state["replay"]["size"] > 0 and len(state["learners"]) == 1
    system = System(tiny(), "inprocess", torch_threads=1)  # not the shared fresh one
    try:
        system.load(state)
        assert system.coordinator.counters["iteration"] == 2
        restored = system.archive()  # the scheduler's archive, from archive.npz's arrays
        assert sorted(restored) == sorted(state["archive"])
        for key, value in state["archive"].items():
            np.testing.assert_array_equal(restored[key], value)
        assert system.iteration()["iteration"] == 3
    finally:
        system.close()
    limits = ckpt.Limits.from_config(json.loads((newest / "manifest.json").read_text())["config"])
    assert (limits.cells, limits.measure_dim, limits.replay_capacity) == (1296, 4, 2000)
    assert 10**12 * 8 > 1000 * limits.data_bytes("coordinator.npz")


# -- each thing once ------------------------------------------------------------------


def test_the_result_archive_is_stored_once(source):
    """archive.npz holds the elites; the coordinator's tree names its arrays
    there and coordinator.npz holds none of them (nor the told batch)."""
    newest = ckpt.list_checkpoints(source / "checkpoints")[-1]
    archive, arrays = arrays_of(newest, "archive.npz"), arrays_of(newest)
    assert len(archive["index"]) > 1
    store = store_of(tree_of(newest))
    assert store["order"] == {"__array__": "archive.index"}
    assert {k: v["__array__"] for k, v in store["fields"].items()} == {
        "solution": "archive.solution", "objective": "archive.objective",
        "measures": "archive.measures", "threshold": "archive.objective",  # equal bytes
        "seed": "archive.seed"}
    for key, value in arrays.items():
        for name, elites in archive.items():
            assert not (value.dtype == elites.dtype and value.shape == elites.shape
                        and np.array_equal(value, elites)), (key, name)
    genome = archive["solution"].shape[1]  # no batch of genomes either
    assert not [k for k, v in arrays.items() if v.ndim == 2 and v.shape[1] == genome]
    # Loaded, the tree finds them in archive.npz (restored: the test above).
    assert load(newest)["coordinator"]["arrays"]["archive.solution"] is not None


def test_a_tree_naming_an_array_archive_npz_lacks_is_refused(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    tree = tree_of(path)
    store_of(tree)["fields"]["solution"] = {"__array__": "archive.nope"}
    (path / "coordinator.json").write_text(json.dumps(tree))
    refit(path)
    refused(lambda: load(path), "coordinator.json", "'archive.nope' missing")


def set_format_version(path: Path, version) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = version
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_a_format_3_checkpoint_still_loads_and_restores(source, tmp_path):
    """Version 3: the archive twice and the told batch; it resumes as before."""
    _, path = copy_run(source, tmp_path)
    unshare(path)
    plant_batch(path)
    set_format_version(path, 3)
    state = load(path)
    assert not [k for k in state["coordinator"]["arrays"] if k.startswith(ckpt.SHARED)]
    system = System(tiny(), "inprocess", torch_threads=1)
    try:
        system.load(state)
        assert system.iteration()["iteration"] == 3
    finally:
        system.close()
    # Arrays named in archive.npz are a version-4 checkpoint's only.
    _, path = copy_run(source, tmp_path / "v4")
    set_format_version(path, 3)
    refused(lambda: load(path), "coordinator.json", "'archive.index' missing")
    for version in (2, 5, "4", True):
        set_format_version(path, version)
        refused(lambda: load(path), f"format version {version!r}", "reads versions 3, 4")


# -- (1), (2): the manifest names only the format's files ----------------------------


def test_manifest_naming_dev_zero_is_refused_at_once(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    # What a stat of /dev/zero reports: 0 bytes; a trusting loader hashes forever.
    name_in_manifest(path, "/dev/zero", {"bytes": os.stat("/dev/zero").st_size,
                                         "sha256": hashlib.sha256(b"").hexdigest()})
    refused(lambda: load(path), "manifest.json", "'/dev/zero'", "not a file of this checkpoint")


def test_manifest_naming_a_file_outside_the_checkpoint_is_refused(source, tmp_path):
    run, path = copy_run(source, tmp_path)
    name = "../../config.yaml"
    assert (path / name).resolve() == (run / "config.yaml").resolve()
    data = (run / "config.yaml").read_bytes()
    name_in_manifest(path, name, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    refused(lambda: load(path), "manifest.json", repr(name), "not a file of this checkpoint")


def test_manifest_must_list_every_required_file(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["coordinator.npz"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    refused(lambda: load(path), "manifest.json", "does not list coordinator.npz")


def test_a_manifest_whose_config_is_not_a_config_is_refused(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["config"]["env"]["id"] = "../../etc/passwd"
    (path / "manifest.json").write_text(json.dumps(manifest))
    refused(lambda: load(path), "manifest.json", "not a valid experiment config", "env")


def test_sizes_are_checked_before_hashing(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["coordinator.npz"]["bytes"] = 10**12
    (path / "manifest.json").write_text(json.dumps(manifest))
    refused(lambda: load(path), "manifest.json", "coordinator.npz", "at most")


# -- (3): arrays checked before allocation -------------------------------------------


def declare_huge(npz: Path, key: str, shape=(10**12,)) -> None:
    """Rewrites ``npz`` with member ``key`` replaced by a .npy header that
    declares ``shape`` float64 elements, followed by a few bytes of data."""
    with zipfile.ZipFile(npz) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    members[f"{key}.npy"] = buf.getvalue() + bytes(64)
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.mark.parametrize("name", ["coordinator.npz", "archive.npz", "replay.npz"])
def test_npz_member_declaring_1e12_elements_is_refused_before_allocation(source, tmp_path,
                                                                         name):
    _, path = copy_run(source, tmp_path)
    key = {"coordinator.npz": big_array(path), "archive.npz": "solution",
           "replay.npz": "obs"}[name]
    declare_huge(path / name, key)
    refit(path)
    with np.load(path / name, allow_pickle=False) as z:  # a trusting loader:
        with pytest.raises((MemoryError, ValueError)):  # 8 TB, or EOF after allocating it
            z[key]
    msg = refused(lambda: load(path), name, f"'{key}'", "(1000000000000,)")
    assert "8.0 TB" in msg


def test_1e12_elements_are_refused_even_under_a_crafted_config(source, tmp_path):
    """A manifest whose config claims a 10^12-cell archive lifts the limits;
    what the member holds on disk still bounds what is read."""
    _, path = copy_run(source, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["config"]["env"]["archive_dims"] = [1000] * 4
    (path / "manifest.json").write_text(json.dumps(manifest))
    key = big_array(path)
    declare_huge(path / "coordinator.npz", key)
    refit(path)
    refused(lambda: load(path), "coordinator.npz", f"'{key}'", "(1000000000000,)",
            "declares 192 bytes in the zip")


def test_compressed_npz_members_are_refused(source, tmp_path):
    """np.savez stores members as is: a deflated member (a possible zip bomb) is refused."""
    _, path = copy_run(source, tmp_path)
    np.savez_compressed(path / "archive.npz", **arrays_of(path, "archive.npz"))
    refit(path)
    refused(lambda: load(path), "archive.npz", "is compressed")


def test_npz_member_whose_zip_size_disagrees_with_its_header_is_refused(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    n = len(arrays_of(path, "archive.npz")["objective"])
    assert n * 8 != 64
    declare_huge(path / "archive.npz", "objective", shape=(n,))  # 64 bytes of data
    refit(path)
    refused(lambda: load(path), "archive.npz", "'objective'", "declares")


# -- (4): JSON nesting is bounded -------------------------------------------------------


@pytest.mark.parametrize("name", ["coordinator.json", "replay.json", "manifest.json"])
def test_json_nested_200000_deep_is_refused_without_recursion(source, tmp_path, name):
    _, path = copy_run(source, tmp_path)
    doc = json.loads((path / name).read_text())
    first = next(iter(doc))
    doc[first] = "DEEP"
    deep = "[" * 200_000 + "]" * 200_000
    text = json.dumps(doc).replace('"DEEP"', deep)
    with pytest.raises(RecursionError):  # what a trusting loader meets
        json.loads(text)
    (path / name).write_text(text)
    if name != "manifest.json":
        refit(path)
    refused(lambda: load(path), name, "nested 20000", "levels deep")


def test_a_200000_deep_state_tree_is_refused_by_the_coordinator(source, coordinator):
    newest = ckpt.list_checkpoints(source / "checkpoints")[-1]
    state = load(newest)["coordinator"]
    node = None
    for _ in range(200_000):
        node = {"__list__": [node]}
    tree = state["tree"]
    tree["__dict__"]["robustness"] = node
    restore_refused(coordinator, newest, tree, state["arrays"], "nested deeper than")


# -- (5): the scheduler's batch of solutions -------------------------------------------
# Not stored since format version 4 (spent once told); what a checkpoint holds
# there is still checked.


def test_the_told_batch_of_solutions_is_not_stored(source):
    newest = ckpt.list_checkpoints(source / "checkpoints")[-1]
    node = tree_of(newest)[SCHED[0]][SCHED[1]][SCHED[2]]
    assert node["_last_called"] == "tell" and node["_cur_solutions"] == {"__fresh__": True}


def test_only_a_batch_already_told_is_left_out():
    """Between ask and tell the batch is still needed, and kept; once told it
    is left out, and the restored scheduler asks exactly what the original does."""
    from dqd_ray import algorithms
    from dqd_ray.algorithms import BuildContext

    cfg = build_config("map_elites", sets=["env.id=QDHopperBulletEnv-v0",
                                           "policy.hidden_sizes=[4]"])

    def fresh():
        ctx = BuildContext(solution_dim=20, x0=np.zeros(20), archive_dims=[10],
                           archive_ranges=[(0.0, 1.0)], qd_offset=-100.0,
                           seed_sequence=np.random.SeedSequence(1), policy_first_layer=(3, 4))
        return algorithms.get(cfg.algorithm.name).build_scheduler(cfg.algorithm, ctx)

    sched = fresh()
    batch = sched.ask()
    tree, arrays = statecodec.encode(sched)
    np.testing.assert_array_equal(statecodec.restore(fresh(), tree, arrays)._cur_solutions,
                                  batch)
    n = len(batch)
    sched.tell(np.arange(n, dtype=float), np.linspace(0, 1, n)[:, None], seed=np.arange(n))
    tree, arrays = statecodec.encode(sched)
    assert tree["attrs"]["_cur_solutions"] == {"__fresh__": True}
    assert not [a for a in arrays.values() if a.shape == batch.shape]
    restored = statecodec.restore(fresh(), tree, arrays)
    assert list(restored._cur_solutions) == []
    np.testing.assert_array_equal(restored.ask(), sched.ask())


def test_strings_in_place_of_the_batch_of_solutions_are_refused(source, tmp_path, coordinator):
    _, path = copy_run(source, tmp_path)
    unshare(path)
    key = plant_batch(path)
    load(path)  # a batch that fits loads
    arrays = arrays_of(path)
    strings = np.full(arrays[key].shape, "rm -rf ~")
    # Through the real restore path: refused, and nothing changes.
    restore_refused(coordinator, path, tree_of(path), {**arrays, key: strings},
                    "_cur_solutions", "<U8")
    np.savez(path / "coordinator.npz", **{**arrays, key: strings})
    refit(path)
    refused(lambda: load(path), "coordinator.npz", f"'{key}'", "dtype <U8")


@pytest.mark.parametrize("batch", [{"__list__": ["rm", "-rf", "~", "x"]},
                                   "not an array", 42])
def test_other_things_in_place_of_the_batch_of_solutions_are_refused(source, tmp_path,
                                                                     coordinator, batch):
    _, path = copy_run(source, tmp_path)
    tree = tree_of(path)
    tree[SCHED[0]][SCHED[1]][SCHED[2]]["_cur_solutions"] = batch
    (path / "coordinator.json").write_text(json.dumps(tree))
    refit(path)
    state = load(path)["coordinator"]  # well-formed on its own; does not fit a coordinator
    restore_refused(coordinator, path, state["tree"], state["arrays"], "_cur_solutions",
                    "where an array of kind 'f'")


def test_a_batch_of_the_wrong_genome_length_is_refused(source, tmp_path, coordinator):
    _, path = copy_run(source, tmp_path)
    unshare(path)
    key = plant_batch(path)
    tree, arrays = tree_of(path), arrays_of(path)
    arrays[key] = np.zeros((4, 7))
    restore_refused(coordinator, path, tree, arrays, "_cur_solutions", "(4, 7)", "21256")


# -- (6): symlinks -----------------------------------------------------------------------


def test_replay_json_symlinked_outside_the_run_is_refused(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    elsewhere = tmp_path / "elsewhere" / "replay.json"
    elsewhere.parent.mkdir()
    shutil.move(path / "replay.json", elsewhere)
    os.symlink(elsewhere, path / "replay.json")
    refit(path)  # same content: the sizes and hashes match through the link
    refused(lambda: load(path), "replay.json", "symbolic link")
    refused(lambda: ckpt.load_replay(path), "replay.json", "symbolic link")  # replay actor


def test_a_symlinked_checkpoint_directory_is_refused(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    real = tmp_path / "elsewhere"
    shutil.move(path, real)
    os.symlink(real, path)
    refused(lambda: load(path), "checkpoint directory is a symbolic link")


# -- (7): attributes the fresh object does not have -------------------------------------


@pytest.mark.parametrize("attr, value", [
    ("__class__", {"__object__": "ribs.archives._archive_stats.ArchiveStats", "attrs": {}}),
    ("__dict__", {"__dict__": {"_archive": None}}),
    ("__reduce_ex__", 1),
])
def test_dunder_attributes_on_the_scheduler_are_refused(source, tmp_path, coordinator,
                                                        attr, value):
    _, path = copy_run(source, tmp_path)
    unshare(path)
    tree, arrays = tree_of(path), arrays_of(path)
    tree[SCHED[0]][SCHED[1]][SCHED[2]][attr] = value
    restore_refused(coordinator, path, tree, arrays, repr(attr), "no dunder names")
    (path / "coordinator.json").write_text(json.dumps(tree))
    refit(path)
    refused(lambda: load(path), "coordinator.json", f"refusing attribute {attr!r}")


@pytest.mark.parametrize("where, value, problem", [
    (("evil",), 1, "has no attribute 'evil'"),
    (("_archive",), {"__object__": "ribs.archives._archive_stats.ArchiveStats", "attrs": {}},
     "ArchiveStats in place of a ribs.archives._grid_archive.GridArchive"),
    (("_archive", "attrs", "_solution_dim"), "21256", "a str ('21256') in place of a number"),
    (("_archive", "attrs", "_rng"), {"__generator__": {"bit_generator": "MT19937", "state": {}}},
     "a MT19937 state for a PCG64 generator"),
])
def test_attributes_that_do_not_fit_the_fresh_scheduler_are_refused(source, tmp_path,
                                                                    coordinator, where, value,
                                                                    problem):
    _, path = copy_run(source, tmp_path)
    tree = tree_of(path)
    node = tree[SCHED[0]][SCHED[1]][SCHED[2]]
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (path / "coordinator.json").write_text(json.dumps(tree))
    refit(path)
    state = load(path)["coordinator"]
    restore_refused(coordinator, path, state["tree"], state["arrays"], problem)


# -- archives: one elite per cell, checked whole ------------------------------------------


def store_of(tree: dict) -> dict:
    return tree[SCHED[0]][SCHED[1]][SCHED[2]]["_archive"]["attrs"]["_store"]["__store__"]


def test_three_elites_in_one_cell_are_refused(source, tmp_path, coordinator):
    _, path = copy_run(source, tmp_path)
    unshare(path)  # the scheduler's archive alone; archive.npz is checked below
    tree, arrays = tree_of(path), arrays_of(path)
    store = store_of(tree)
    order = store["order"]["__array__"]
    arrays[order] = np.full(3, arrays[order][0], arrays[order].dtype)
    for ref in store["fields"].values():
        arrays[ref["__array__"]] = arrays[ref["__array__"]][:3]
    restore_refused(coordinator, path, tree, arrays, "3 elites in 1 cells")
    np.savez(path / "coordinator.npz", **arrays)
    refit(path)
    refused(lambda: load(path), "coordinator.json", "_store.order", "3 elites in 1 cells")


def test_repeated_or_out_of_range_cells_in_archive_npz_are_refused(source, tmp_path):
    _, path = copy_run(source, tmp_path)
    archive = arrays_of(path, "archive.npz")
    n = len(archive["index"])
    np.savez(path / "archive.npz", **{**archive, "index": np.zeros_like(archive["index"])})
    refit(path)
    refused(lambda: load(path), "archive.npz", f"{n} elites in 1 cells")
    np.savez(path / "archive.npz",
             **{**archive, "index": np.full_like(archive["index"], 1296)})
    refit(path)
    refused(lambda: load(path), "archive.npz", "cell index out of range [0, 1296)")


def test_a_store_is_checked_whole_before_any_of_it_changes(source, tmp_path, coordinator):
    """The last field is wrong: the cells and earlier fields must stay as they were."""
    _, path = copy_run(source, tmp_path)
    unshare(path)
    tree, arrays = tree_of(path), arrays_of(path)
    fields = store_of(tree)["fields"]
    last = list(fields)[-1]
    key = fields[last]["__array__"]
    arrays[key] = arrays[key].astype(np.float64)  # seed: int64 in the archive
    restore_refused(coordinator, path, tree, arrays, f"_store.{last}", "float64")


# -- falling back to the previous intact checkpoint ------------------------------------


def test_latest_loadable_skips_refused_checkpoints_newest_first(source, tmp_path):
    run, newest = copy_run(source, tmp_path)
    key = big_array(newest)
    arrays = arrays_of(newest)
    np.savez(newest / "coordinator.npz", **{**arrays, key: np.full(arrays[key].shape, "x")})
    refit(newest)
    root = run / "checkpoints"
    # Intact on disk (verify passes), refused when loaded: latest_valid alone picks it.
    assert ckpt.latest_valid(root)[0] == newest
    with pytest.warns(UserWarning, match="skipping checkpoint.*coordinator.npz.*dtype <U1"):
        path, manifest, state = ckpt.latest_loadable(root)
    assert path.name == "ckpt_0000001" and manifest["iteration"] == 1
    assert state["coordinator"]["tree"] and state["archive"]["index"].size
    # After the live system refused the newest one: the one before it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ckpt.latest_loadable(root, older_than=newest)[0].name == "ckpt_0000001"
        assert ckpt.latest_loadable(root, older_than=path) is None
    # A format version this code does not read is not skipped.
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["format_version"] = 99
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        ckpt.latest_loadable(root)


def test_latest_loadable_checks_each_manifest_before_loading_its_files(source, tmp_path):
    run, newest = copy_run(source, tmp_path)
    root, seen = run / "checkpoints", []

    def check(manifest):  # e.g. resume: the checkpoint's config is the run's
        seen.append(manifest["iteration"])
        if manifest["iteration"] == 2:
            raise ckpt.CheckpointError(f"{newest}: manifest.json: another run's config")

    with pytest.warns(UserWarning, match="another run's config"):
        assert ckpt.latest_loadable(root, check=check)[0].name == "ckpt_0000001"
    assert seen == [2, 1]

    def other(manifest):
        raise KeyError("not a checkpoint problem")

    with pytest.raises(KeyError):
        ckpt.latest_loadable(root, check=other)


def test_resume_falls_back_to_the_previous_intact_checkpoint(source, tmp_path):
    run, newest = copy_run(source, tmp_path)
    name_in_manifest(newest, "/dev/zero", {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()})
    with pytest.warns(UserWarning, match="skipping checkpoint.*'/dev/zero'"):
        exp = Experiment.resume(run, ["iterations=2"], backend="inprocess")
    assert exp.resume_state[0].name == "ckpt_0000001"
    summary = exp.run()
    assert summary["final"]["iteration"] == 2


def test_resume_falls_back_when_the_live_coordinator_refuses_the_newest(source, tmp_path):
    """A checkpoint that loads but that the freshly built coordinator refuses
    (an attribute the scheduler lacks) is skipped the same way, at restore."""
    run, newest = copy_run(source, tmp_path)
    tree = tree_of(newest)
    tree[SCHED[0]][SCHED[1]][SCHED[2]]["evil"] = 1
    (newest / "coordinator.json").write_text(json.dumps(tree))
    refit(newest)
    exp = Experiment.resume(run, ["iterations=3"], backend="inprocess")
    assert exp.resume_state[0] == newest  # it loads: only the live object can refuse it
    with pytest.warns(UserWarning, match="skipping checkpoint.*coordinator.json.*evil"):
        summary = exp.run()
    assert exp.resume_state[0].name == "ckpt_0000001"
    assert summary["final"]["iteration"] == 3
    from dqd_ray.loop import read_metrics

    assert [m["iteration"] for m in read_metrics(run)] == [1, 2, 3]


# -- durability ------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds through /proc")
def test_save_checkpoint_fsyncs_files_and_directories_before_renaming_and_pruning(
        source, tmp_path, monkeypatch):
    newest = ckpt.list_checkpoints(source / "checkpoints")[-1]
    state = load(newest)
    config = json.loads((newest / "manifest.json").read_text())["config"]
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("rename", str(b)))
        return real_replace(a, b)

    def rmtree(p, *a, **kw):
        events.append(("remove", str(p)))
        return real_rmtree(p, *a, **kw)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    root = tmp_path / "checkpoints"
    for it in (1, 2):
        ckpt.save_checkpoint(root, it, state, config, keep=1)
    second = events[events.index(("rename", str(root / "ckpt_0000001"))) + 1:]
    renamed = second.index(("rename", str(root / "ckpt_0000002")))
    synced = {Path(p).name for kind, p in second[:renamed] if kind == "fsync"}
    assert set(state_files := {p.name for p in (root / "ckpt_0000002").iterdir()}) <= synced
    assert "manifest.json" in state_files
    assert any(n.startswith(".tmp_ckpt_0000002") for n in synced)  # the directory
    pruned = second.index(("remove", str(root / "ckpt_0000001")))
    after = [p for kind, p in second[renamed:pruned] if kind == "fsync"]
    assert after and all(p == str(root) for p in after)  # the parent, before pruning
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["ckpt_0000002"]
    load(root / "ckpt_0000002")
