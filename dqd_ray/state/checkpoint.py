"""Atomic, versioned checkpoints of a whole run, and a loader that refuses,
quickly, what it does not expect.

A checkpoint is a directory ``checkpoints/ckpt_<iteration>`` written under a
temporary name, fsynced, and renamed into place when complete, so a crash
never leaves a half-written checkpoint under a real name. The loop writes it
in the background while the next iteration runs
(:class:`~dqd_ray.state.writer.CheckpointWriter`); a crash during that write
leaves the previous checkpoint as the resume point. Inside:

- ``manifest.json``: format version, iteration, resolved config, and the
  size and sha256 of every other file (written last);
- ``archive.npz``: the result archive's occupied cells (solutions, objectives,
  measures, thresholds, seeds, cell index), for plots and analysis;
- ``coordinator.json`` + ``coordinator.npz``: scheduler, archives (occupied
  cells only), emitters, CMA-ES state, RNGs and counters as a JSON tree and
  numeric arrays (see :mod:`dqd_ray.state.statecodec`), restored onto a freshly
  built coordinator through an explicit allowlist of types;
- ``learner_<i>.pt``: TD3 ensembles and optimizers (torch state dicts, load
  with ``weights_only=True``);
- ``replay.npz`` (+ ``replay.json``): replay contents, when configured.

Each thing is written once (format version 4). The result archive's elites
are held by the scheduler's archive too; ``archive.npz`` is their one copy,
and the coordinator's tree names those arrays ``archive.<member>`` instead of
holding them again (:func:`share_archive`: an array of the coordinator's that
equals a member of ``archive.npz`` in dtype, shape and every byte). Keeping
``archive.npz`` (rather than reading the archive out of the coordinator's
tree) leaves every reader of it as it was and adds no new reader of the
tree: on load, ``archive.npz`` is read and checked as before (numeric
members of the config's shapes, one elite per cell, cells in range), its
members join the coordinator's arrays under those names, and the tree is
validated whole as before. The batch the scheduler asked for and was told
about is spent, and not stored (:func:`dqd_ray.state.statecodec.transient`).
Checkpoints of format version 3 (each thing twice) still load.

Nothing in a checkpoint is pickled and loading one runs no code from it:
arrays are read with ``allow_pickle=False``, torch files with
``weights_only=True``, and the coordinator's tree admits only allowlisted
types. A checkpoint may also come from someone else (a shared directory, a
copied run), so nothing in it is trusted before it is checked, and each check
comes before the work it protects (:mod:`dqd_ray.state.checkpoint_files`):

- the manifest (small, shallow JSON) names exactly the format's files: no
  paths, no ``..``, each required one listed; each a regular file inside the
  checkpoint directory (no symlink, no device), of the manifest's size, within
  a size derived from the config, all before any file is hashed;
- JSON files are bounded in size and nesting (checked without recursion);
- every npz member's ``.npy`` header (dtype, shape, declared size) is read
  before any array: numeric dtypes only, shapes and sizes within the
  :class:`~dqd_ray.state.checkpoint_files.Limits` of the checkpoint's config;
- the coordinator's tree is validated whole (allowlisted types, no dunder
  attributes, one elite per archive cell: :func:`dqd_ray.state.statecodec.validate`),
  and fitted against the fresh coordinator before anything is restored
  (:func:`dqd_ray.state.statecodec.restore`).

Every refusal is a :class:`CheckpointError` ``"<checkpoint>: <file>: <problem>"``;
:func:`latest_loadable` skips refused checkpoints, newest first, down to the
newest one that loads, and :func:`restore_refusal` names a checkpoint whose
state the live system refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dqd_ray.state.checkpoint_files import (  # noqa: F401
    MAX_LEARNERS,
    MAX_MANIFEST_BYTES,
    CheckpointError,
    Limits,
    fail,
    json_depth,
    load_learner,
    open_regular,
    read_archive,
    read_json,
    read_npz,
    sha256,
)

FORMAT_VERSION = 4  # 2: one target-noise stream per TD3 agent; 3: no pickle;
# 4: the result archive's arrays once (archive.npz), no told batch
READABLE_VERSIONS = (3, 4)
SHARED = "archive."  # how coordinator.json names an array of archive.npz
MANIFEST = "manifest.json"
ASIDE = ".replaced"


def _allowed_names(num_learners: int, has_replay: bool) -> set[str]:
    names = {"archive.npz", "coordinator.json", "coordinator.npz"}
    names |= {f"learner_{i}.pt" for i in range(num_learners)}
    if has_replay:
        names |= {"replay.npz", "replay.json"}
    return names


def _fsync(path: Path, directory: bool = False) -> None:
    """Flushes a file (or a directory's entries) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # platforms that cannot open a directory (Windows)
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writing -------------------------------------------------------------------------


def _to_jsonable(x):
    if isinstance(x, dict):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _plain(x):
    """Torch-loadable with ``weights_only=True``: numpy values become Python/tensors."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.array(x))
    if isinstance(x, np.generic):
        return x.item()
    return x


def share_archive(coordinator: dict, archive: dict) -> dict:
    """The coordinator's state ``{"tree", "arrays"}`` with every array that
    ``archive`` (what ``archive.npz`` holds) also holds, in dtype, shape and
    every byte, named there (``archive.<member>``) and left out of its arrays."""
    found: dict[tuple, list] = {}
    for name, value in archive.items():
        value = np.asarray(value)
        found.setdefault((value.dtype.str, value.shape), []).append((name, value))
    rename = {}
    for key, value in coordinator["arrays"].items():
        for name, other in found.get((value.dtype.str, value.shape), ()):
            if _same_bytes(value, other):
                rename[key] = SHARED + name
                break
    if not rename:
        return coordinator
    return {"tree": _renamed(coordinator["tree"], rename),
            "arrays": {k: v for k, v in coordinator["arrays"].items() if k not in rename}}


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit (NaNs and signed zeros too), without copying."""
    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    return np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _renamed(node, rename: dict[str, str]):
    if isinstance(node, list):
        return [_renamed(v, rename) for v in node]
    if not isinstance(node, dict):
        return node
    if isinstance(node.get("__array__"), str) and node["__array__"] in rename:
        return {**node, "__array__": rename[node["__array__"]]}
    return {k: _renamed(v, rename) for k, v in node.items()}


def save_checkpoint(ckpt_root: str | os.PathLike, iteration: int, state: dict[str, Any],
                    config: dict, keep: int = 3) -> Path:
    """Writes one checkpoint atomically and durably, and prunes old ones.

    Every file and the temporary directory are fsynced before the directory
    is renamed into place, and the parent directory after the rename (before
    anything older is removed), so a power loss leaves either the previous
    checkpoints or the new one complete on disk.

    Args:
        ckpt_root: The run's ``checkpoints`` directory.
        iteration: Completed iterations.
        state: ``coordinator`` (``{"tree", "arrays"}``), ``archive`` (dict of arrays),
            ``learners`` (list of state dicts), optional ``replay`` (replay
            state dict) and ``extra`` (JSON-able).
        config: Resolved config (JSON-able dict).
        keep: Checkpoints kept.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt_{iteration:07d}"
    for stale in root.glob(".tmp_ckpt_*"):  # left by a crash mid-write (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob("ckpt_*" + ASIDE):  # a rewrite that crashed (see below)
        twin = root / aside.name[: -len(ASIDE)]
        if twin.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, twin)
    tmp = root / f".tmp_ckpt_{iteration:07d}_{os.getpid()}_{time.time_ns()}"
    tmp.mkdir()
    try:
        coord = share_archive(state["coordinator"], state["archive"])
        (tmp / "coordinator.json").write_text(json.dumps(coord["tree"]))
        np.savez(tmp / "coordinator.npz", **coord["arrays"])
        np.savez(tmp / "archive.npz", **state["archive"])
        for i, ls in enumerate(state.get("learners", [])):
            torch.save(_plain(ls), tmp / f"learner_{i}.pt")
        replay = state.get("replay")
        if replay is not None:
            data = replay.get("data", {})
            np.savez(tmp / "replay.npz", **data)
            meta = {k: v for k, v in replay.items() if k != "data"}
            (tmp / "replay.json").write_text(json.dumps(_to_jsonable(meta)))
        files = {}
        for p in sorted(tmp.iterdir()):
            with open(p, "rb") as fo:
                files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256(fo)}
        manifest = {"format_version": FORMAT_VERSION, "iteration": iteration,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config,
                    "num_learners": len(state.get("learners", [])),
                    "has_replay": replay is not None, "extra": _to_jsonable(state.get("extra", {})),
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp, directory=True)
        # Rewriting a checkpoint of the same iteration: the old one is moved
        # aside (and still found by list_checkpoints) until the new one is in
        # place, so a crash at any point leaves a readable checkpoint.
        aside = root / (final.name + ASIDE)
        if final.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync(root, directory=True)  # the new name is durable before the old one goes
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root, directory=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading -------------------------------------------------------------------------


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Checkpoint directories, oldest first; a checkpoint moved aside by a
    rewrite that did not finish stands for its iteration."""
    root = Path(ckpt_root)
    if not root.exists():
        return []
    found = {}
    for p in root.iterdir():
        if not (p.is_dir() and p.name.startswith("ckpt_")):
            continue
        name = p.name[: -len(ASIDE)] if p.name.endswith(ASIDE) else p.name
        if name not in found or not p.name.endswith(ASIDE):
            found[name] = p
    return [found[k] for k in sorted(found)]


def read_manifest(path: Path) -> tuple[dict, Limits]:
    """The manifest of checkpoint ``path``, checked for shape (not hashed),
    and the :class:`Limits` of its config.

    Raises:
        CheckpointError: Naming the problem; a format version this code does
            not read says so (``"format version"`` in the message).
    """
    path = Path(path)
    if path.is_symlink():
        raise CheckpointError(f"{path}: the checkpoint directory is a symbolic link")
    if not (path / MANIFEST).exists() and not (path / MANIFEST).is_symlink():
        raise CheckpointError(f"{path}: no manifest (half-written checkpoint)")
    manifest = read_json(path, MANIFEST, limit=MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict):
        fail(path, MANIFEST, "unreadable manifest (not a JSON object)")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}, this code reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; resume it with the dqd-ray version "
            "that wrote it")
    files, n, replay = manifest.get("files"), manifest.get("num_learners"), \
        manifest.get("has_replay")
    if not isinstance(files, dict) or type(n) is not int or not 0 <= n <= MAX_LEARNERS \
            or type(replay) is not bool or type(manifest.get("iteration")) is not int \
            or manifest["iteration"] < 0 or not isinstance(manifest.get("config"), dict) \
            or not isinstance(manifest.get("extra", {}), dict):
        fail(path, MANIFEST, "malformed manifest (files, num_learners, has_replay, "
                             "iteration, config or extra)")
    allowed = _allowed_names(n, replay)
    for name in files:
        if name not in allowed:
            fail(path, MANIFEST, f"names {name!r}, which is not a file of this checkpoint "
                 f"(it may name only {sorted(allowed)})")
    for name in sorted(allowed - set(files)):
        fail(path, MANIFEST, f"does not list {name}, a file this checkpoint must hold")
    try:
        limits = Limits.from_config(manifest["config"])
    except CheckpointError as err:
        fail(path, MANIFEST, str(err))
    if n > limits.num_learners:
        fail(path, MANIFEST, f"lists {n} learner files; the config runs "
                             f"{limits.num_learners} learners")
    for name, info in files.items():
        if not (isinstance(info, dict) and type(info.get("bytes")) is int
                and info["bytes"] >= 0 and isinstance(info.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", info["sha256"])):
            fail(path, MANIFEST, f"malformed entry for {name}")
        if info["bytes"] > limits.file_bytes(name):
            fail(path, MANIFEST, f"says {name} is {info['bytes']} bytes; this config's "
                 f"checkpoints hold at most {limits.file_bytes(name)}")
    return manifest, limits


def verify(path: Path) -> dict:
    """Returns the manifest if the checkpoint is complete and intact.

    The manifest is checked first (:func:`read_manifest`), then every file's
    type and size, and only then are the files hashed.

    Raises:
        CheckpointError: Naming what is missing, corrupted or not expected.
    """
    path = Path(path)
    manifest, limits = read_manifest(path)
    files = manifest["files"]
    for name, info in files.items():  # types and sizes of all, before hashing any
        open_regular(path, name, info["bytes"], limits.file_bytes(name)).close()
    for name, info in files.items():
        with open_regular(path, name, info["bytes"]) as fo:
            if sha256(fo) != info["sha256"]:
                fail(path, name, "is corrupted (sha256 mismatch)")
    return manifest


def latest_valid(ckpt_root: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest intact checkpoint; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return path, verify(path)
        except CheckpointError as err:
            if "format version" in str(err):
                raise
            _skip(err)
    return None


def _skip(err: CheckpointError) -> None:
    warnings.warn(f"skipping checkpoint: {err}", stacklevel=3)
    print(f"warning: skipping checkpoint: {err}")


def latest_loadable(ckpt_root: str | os.PathLike, older_than: str | os.PathLike | None = None,
                    check: Callable[[dict], None] | None = None,
                    refused: list[str] | None = None
                    ) -> tuple[Path, dict, dict[str, Any]] | None:
    """The newest checkpoint that verifies *and* loads: ``(path, manifest, state)``.

    Checkpoints refused by :func:`verify` or :func:`load_checkpoint` are
    skipped, newest first, each with a warning naming the file and the
    problem. A format version this code does not read is raised at once.

    Args:
        ckpt_root: The run's ``checkpoints`` directory.
        older_than: Consider only checkpoints older than this one (a checkpoint
            whose state the live system then refused to restore).
        check: Called with each verified manifest before its files are loaded
            (resume: the manifest's config must be the run's, so that the
            limits the files are read under are the run's own). A
            :class:`CheckpointError` it raises skips the checkpoint; any other
            exception propagates.
        refused: If given, each skipped checkpoint's refusal is appended to it.
    """
    paths = list_checkpoints(ckpt_root)
    if older_than is not None:
        stop = Path(older_than).name.removesuffix(ASIDE)
        paths = [p for p in paths if p.name.removesuffix(ASIDE) < stop]
    for path in reversed(paths):
        try:
            manifest = verify(path)
            if check is not None:
                check(manifest)
            return path, manifest, load_checkpoint(path, manifest)
        except CheckpointError as err:
            if "format version" in str(err):
                raise
            _skip(err)
            if refused is not None:
                refused.append(str(err))
    return None


def load_checkpoint(path: Path, manifest: dict) -> dict[str, Any]:
    """Reads a verified checkpoint: JSON, numeric arrays and weights-only torch files.

    Every file is reopened as a regular file of the manifest's size; every
    array's header is checked against the :class:`Limits` of the manifest's
    config before it is read; ``archive.npz`` is checked (one elite per cell,
    cells in range) before the coordinator's tree, which may name its arrays
    (format version 4, :func:`share_archive`), is validated whole.

    Raises:
        CheckpointError: A file that is not what the format allows.
    """
    import dqd_ray.algorithms  # noqa: F401 - registers the allowlisted types
    from dqd_ray.state.statecodec import StateError, validate

    path = Path(path)
    limits = Limits.from_config(manifest["config"])
    size = {name: info["bytes"] for name, info in manifest["files"].items()}
    archive = read_archive(path, limits, size["archive.npz"])
    try:
        tree = read_json(path, "coordinator.json", size["coordinator.json"])
        arrays = read_npz(path, "coordinator.npz", limits, size["coordinator.npz"],
                          kinds="biufc")
        if manifest["format_version"] >= 4:  # the arrays it shares with archive.npz
            arrays.update({SHARED + k: v for k, v in archive.items()})
        validate(tree, arrays)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: unreadable coordinator state "
                              f"({str(err).removeprefix(f'{path}: ')})") from None
    except StateError as err:
        raise CheckpointError(f"{path}: unreadable coordinator state (coordinator.json: "
                              f"{err})") from None
    state: dict[str, Any] = {
        "coordinator": {"tree": tree, "arrays": arrays},
        "learners": [load_learner(path, f"learner_{i}.pt", size[f"learner_{i}.pt"], limits)
                     for i in range(manifest["num_learners"])],
        "extra": manifest.get("extra", {}),
        "archive": archive,
    }
    if manifest.get("has_replay"):
        state["replay"] = load_replay(path, manifest)
    return state


def restore_refusal(path: Path, err: BaseException) -> CheckpointError:
    """The error to raise when a live system refuses to restore checkpoint
    ``path`` (e.g. ``Coordinator.load_state_dict``'s
    :class:`~dqd_ray.state.statecodec.StateError`: the tree does not fit the fresh
    coordinator), naming the file the refused state came from."""
    from dqd_ray.state.statecodec import StateError

    cause = getattr(err, "cause", None)  # a Ray task error wraps the actor's exception
    text = str(cause if isinstance(cause, BaseException) else err).strip()
    text = text.splitlines()[-1] if text else repr(err)
    if isinstance(err, StateError) or isinstance(cause, StateError):
        return CheckpointError(f"{path}: coordinator.json: refused by this run's "
                               f"coordinator ({text})")
    return CheckpointError(f"{path}: cannot restore this checkpoint ({text})")


def load_replay(path: Path, manifest: dict | None = None) -> dict[str, Any]:
    """The replay state of a verified checkpoint that has one (``has_replay``).

    ``replay.json`` must hold the buffer's counters and RNG state for the
    shapes of the config; ``replay.npz`` exactly its fields, ``size`` rows each.
    """
    path = Path(path)
    if manifest is None:
        manifest, limits = read_manifest(path)
    else:
        limits = Limits.from_config(manifest["config"])
    size = {name: info["bytes"] for name, info in manifest["files"].items()}
    if "replay.json" not in size:
        fail(path, MANIFEST, "lists no replay files")
    meta = read_json(path, "replay.json", size["replay.json"])
    keys = {"pos", "size", "total_added", "rng", "capacity", "shapes"}
    if not isinstance(meta, dict) or set(meta) != keys:
        fail(path, "replay.json", f"holds {sorted(meta) if isinstance(meta, dict) else meta!r}"
             f"; expected the keys {sorted(keys)}")
    shapes = [limits.obs_dim, limits.act_dim, 1 + limits.measure_dim]
    counts = [meta["pos"], meta["size"], meta["total_added"], meta["capacity"]]
    if meta["shapes"] != shapes:
        fail(path, "replay.json", f"shapes {meta['shapes']}; this config's are {shapes}")
    if not all(type(c) is int and c >= 0 for c in counts) or meta["capacity"] != \
            limits.replay_capacity or meta["size"] > meta["capacity"] or \
            meta["pos"] > meta["capacity"] or not isinstance(meta["rng"], dict):
        fail(path, "replay.json", f"counters pos={meta['pos']!r} size={meta['size']!r} "
             f"capacity={meta['capacity']!r} (config: {limits.replay_capacity}) or rng "
             "do not fit")
    try:  # the buffer's generator is a PCG64: try the state on a scratch one
        if meta["rng"].get("bit_generator") != "PCG64":
            raise ValueError(f"a {meta['rng'].get('bit_generator')!r} state")
        np.random.PCG64().state = meta["rng"]
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        fail(path, "replay.json", f"bad generator state ({err})")
    meta["shapes"] = tuple(meta["shapes"])
    meta["data"] = read_npz(path, "replay.npz", limits, size["replay.npz"])
    rows = {k: len(v) for k, v in meta["data"].items()}
    if set(rows.values()) != {meta["size"]}:
        fail(path, "replay.npz", f"rows {rows}; replay.json says {meta['size']}")
    return meta
