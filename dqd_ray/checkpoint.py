"""Atomic, versioned checkpoints of a whole run.

A checkpoint is a directory ``checkpoints/ckpt_<iteration>`` written under a
temporary name and renamed into place when complete, so a crash never leaves
a half-written checkpoint under a real name. Inside:

- ``manifest.json``: format version, iteration, resolved config, and the
  size and sha256 of every file (written last);
- ``archive.npz``: the result archive's occupied cells (solutions, objectives,
  measures, index), for plots and analysis;
- ``coordinator.json`` + ``coordinator.npz``: scheduler, archives (occupied
  cells only), emitters, CMA-ES state, RNGs and counters as a JSON tree and
  numeric arrays (see :mod:`dqd_ray.statecodec`), restored onto a freshly
  built coordinator through an explicit allowlist of types;
- ``learner_<i>.pt``: TD3 ensembles and optimizers (torch state dicts, load
  with ``weights_only=True``);
- ``replay.npz`` (+ ``replay.json``): replay contents, when configured.

Nothing in a checkpoint is pickled and loading one runs no code from it:
arrays are read with ``allow_pickle=False``, torch files with
``weights_only=True``, and the coordinator's tree admits only allowlisted
types.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 3  # 2: one target-noise stream per TD3 agent; 3: no pickle
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def save_checkpoint(ckpt_root: str | os.PathLike, iteration: int, state: dict[str, Any],
                    config: dict, keep: int = 3) -> Path:
    """Writes one checkpoint atomically and prunes old ones.

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
        coord = state["coordinator"]
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
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.iterdir())}
        manifest = {"format_version": FORMAT_VERSION, "iteration": iteration,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": config,
                    "num_learners": len(state.get("learners", [])),
                    "has_replay": replay is not None, "extra": _to_jsonable(state.get("extra", {})),
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        # Rewriting a checkpoint of the same iteration: the old one is moved
        # aside (and still found by list_checkpoints) until the new one is in
        # place, so a crash at any point leaves a readable checkpoint.
        aside = root / (final.name + ASIDE)
        if final.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


ASIDE = ".replaced"


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


def verify(path: Path) -> dict:
    """Returns the manifest if the checkpoint is complete and intact.

    Raises:
        CheckpointError: Naming what is missing or corrupted.
    """
    mpath = path / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"{path}: no manifest (half-written checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: unreadable manifest ({err})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this code reads version "
            f"{FORMAT_VERSION}; resume it with the dqd-ray version that wrote it")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{path}: file {name} is missing")
        if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{path}: file {name} is corrupted (size or sha256 mismatch)")
    return manifest


def latest_valid(ckpt_root: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest intact checkpoint; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return path, verify(path)
        except CheckpointError as err:
            if "format version" in str(err):
                raise
            warnings.warn(f"skipping checkpoint: {err}", stacklevel=2)
            print(f"warning: skipping checkpoint: {err}")
    return None


def load_checkpoint(path: Path, manifest: dict) -> dict[str, Any]:
    """Reads a verified checkpoint: JSON, numeric arrays and weights-only torch files.

    Raises:
        CheckpointError: A file that is not what the format allows.
    """
    try:
        tree = json.loads((path / "coordinator.json").read_text())
        with np.load(path / "coordinator.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable coordinator state ({err})") from None
    import dqd_ray.algorithms  # noqa: F401 - registers the allowlisted types
    from dqd_ray.statecodec import StateError, validate

    try:
        validate(tree, arrays)
    except StateError as err:
        raise CheckpointError(f"{path}: refusing the coordinator state: {err}") from None
    state: dict[str, Any] = {
        "coordinator": {"tree": tree, "arrays": arrays},
        "learners": [torch.load(path / f"learner_{i}.pt", weights_only=True, map_location="cpu")
                     for i in range(manifest["num_learners"])],
        "extra": manifest.get("extra", {}),
    }
    with np.load(path / "archive.npz", allow_pickle=False) as z:
        state["archive"] = {k: z[k] for k in z.files}
    if manifest.get("has_replay"):
        state["replay"] = load_replay(path)
    return state


def load_replay(path: Path) -> dict[str, Any]:
    """The replay state of a verified checkpoint that has one (``has_replay``)."""
    meta = json.loads((path / "replay.json").read_text())
    meta["shapes"] = tuple(meta["shapes"])
    with np.load(path / "replay.npz", allow_pickle=False) as z:
        meta["data"] = {k: z[k] for k in z.files}
    return meta
