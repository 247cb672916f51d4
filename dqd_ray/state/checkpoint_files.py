"""Reading a checkpoint's files without trusting them (see :mod:`dqd_ray.state.checkpoint`).

Whoever can write a checkpoint directory (a shared disk, a copied run) must
not be able to make a resume hang, exhaust memory, crash with a traceback or
read files outside the checkpoint. Every reader here therefore checks before
it reads or allocates:

- :func:`open_regular`: a regular file inside the checkpoint (no symlink, no
  device), of the size the manifest says and at most a size from the config;
- :func:`read_json`: bounded size and nesting (:func:`json_depth`, no recursion);
- :func:`read_npz`: every member's ``.npy`` header (dtype, shape, declared
  size) against :class:`Limits` before any array is read;
- :func:`read_archive`, :func:`load_learner`: the result archive's cells, a
  torch file's records, then ``torch.load(weights_only=True)``.

Each refusal is a :class:`CheckpointError` ``"<checkpoint>: <file>: <problem>"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_MANIFEST_BYTES = 4 << 20  # the manifest holds a config and a few hashes: KBs
MAX_JSON_BYTES = 16 << 20  # coordinator.json (KBs in practice), replay.json (bytes)
MAX_JSON_DEPTH = 64  # a coordinator tree is about 15 deep, a manifest 5
MAX_NPZ_MEMBERS = 10_000  # a coordinator stores ~50 arrays per emitter
NPZ_SLACK_BYTES = 16 << 20  # zip and .npy headers on top of the array data
MAX_LEARNERS = 1024
REPLAY_FIELDS = ("obs", "action", "reward", "next_obs", "terminated")
_NUMERIC = "biuf"  # dtype kinds a checkpoint's arrays may have (+ complex: coordinator)


class CheckpointError(RuntimeError):
    pass


def fail(path: Path, name: str, problem: str):
    raise CheckpointError(f"{path}: {name}: {problem}")


# -- limits ------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The largest arrays and files a checkpoint of one config may hold.

    Derived from the checkpoint's own config (on resume the loop has compared
    it with the run's ``config.yaml``; only settings that change no limit may
    differ). With ``D`` the genome length, ``C`` the archive's cells, ``k`` the
    measures, ``O``/``A`` the observation/action sizes, ``R`` the replay
    capacity and ``B`` :attr:`batch_rows`:

    - ``archive.npz``: at most ``C`` elites; ``solution`` ``(n, D)``,
      ``measures`` ``(n, k)``, the other fields ``(n,)``;
    - ``replay.npz``: at most ``R`` transitions of ``obs``/``next_obs`` ``(n, O)``,
      ``action`` ``(n, A)``, ``reward`` ``(n, 1+k)``, ``terminated`` ``(n,)``;
    - ``coordinator.npz``: no array larger than ``(C + B) x W`` elements of 8
      bytes, ``W = max(D, O, A, 1+k)`` (an archive of genomes, a batch of
      branches, a jacobian batch, ME-ES's per-cell statistics), and at most
      3 such in all (CMA-MAEGA keeps two archives);
    - ``learner_<i>.pt``: 16 x (1+k) x (D + 2 x critic parameters) x 8 bytes
      (an actor and twin critics per objective, their targets and Adam moments
      are 4 x (1+k) x (D + 2 x critic); the rest is headroom);

    plus :data:`NPZ_SLACK_BYTES` of headers per file. The paper's presets
    (D ~ 19k..21k, C = 1000..1296, R = 10^6) allow 200..550 MB per coordinator
    array and at most 1.7 GB for a whole file, far
    below one array that declares 10^12 elements (8 TB).
    """

    genome_dim: int
    cells: int
    measure_dim: int
    obs_dim: int
    act_dim: int
    replay_capacity: int
    batch_rows: int
    critic_params: int
    num_learners: int

    @classmethod
    def from_config(cls, config) -> Limits:
        """From an :class:`~dqd_ray.config.ExperimentConfig` or its JSON dump.

        Raises:
            CheckpointError: The config is not a valid experiment config.
        """
        from dqd_ray.config import ExperimentConfig
        from dqd_ray.envs import env_metadata
        from dqd_ray.roles.policy import PolicySpec

        try:
            cfg = config if isinstance(config, ExperimentConfig) else \
                ExperimentConfig.model_validate(config)
            meta = env_metadata(cfg.env.id)
            spec = PolicySpec.from_config(cfg.env.id, cfg.policy)
            dims = cfg.env.resolved_dims()
        except (ValueError, TypeError, KeyError) as err:
            errors = getattr(err, "errors", None)  # pydantic: the field and the problem
            why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                            for e in errors()[:3]) if callable(errors) else str(err).strip()
            raise CheckpointError(f"its config is not a valid experiment config ({why})"
                                  ) from None
        k = len(dims)
        algo = cfg.algorithm.model_dump()
        # Solutions, branches and jacobian rows one iteration holds: every batch
        # setting of the algorithm, per emitter, per objective (generously).
        settings = sum(v for v in algo.values() if type(v) is int and v > 0)
        batch_rows = (max(1, int(algo.get("num_emitters", 1))) * (1 + k) * (2 + settings)
                      + cfg.es.num_samples)
        sizes = [meta.obs_dim + meta.act_dim, *cfg.td3.critic_hidden_sizes, 1]
        critic = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
        return cls(genome_dim=spec.genome_dim, cells=math.prod(dims), measure_dim=k,
                   obs_dim=meta.obs_dim, act_dim=meta.act_dim,
                   replay_capacity=cfg.td3.replay_capacity, batch_rows=batch_rows,
                   critic_params=critic, num_learners=cfg.resources.num_learners)

    @property
    def width(self) -> int:
        return max(self.genome_dim, self.obs_dim, self.act_dim, 1 + self.measure_dim)

    @property
    def coordinator_member_bytes(self) -> int:
        return 8 * (self.cells + self.batch_rows) * self.width

    def data_bytes(self, name: str) -> int:
        """The most array (or tensor) data file ``name`` may hold."""
        k = self.measure_dim
        if name == "archive.npz":
            return 8 * self.cells * (self.genome_dim + k + 8)
        if name == "replay.npz":
            return 8 * self.replay_capacity * (2 * self.obs_dim + self.act_dim + k + 2)
        if name == "coordinator.npz":
            return 3 * self.coordinator_member_bytes
        if name.startswith("learner_"):
            return 8 * 16 * (1 + k) * (self.genome_dim + 2 * self.critic_params)
        return MAX_JSON_BYTES

    def file_bytes(self, name: str) -> int:
        """The largest file ``name`` may be (checked before it is hashed)."""
        if name.endswith(".json"):
            return MAX_JSON_BYTES
        return self.data_bytes(name) + NPZ_SLACK_BYTES

    def member(self, name: str, member: str, shape: tuple, rows: int | None) -> str | None:
        """Why member ``member`` (shape ``shape``) of ``name`` does not fit, or None.

        ``rows``: the first member's length (all of a file's fields share it).
        """
        if name == "coordinator.npz":
            return None  # bounded by size only; the tree fixes each array's shape
        k, obs, act = self.measure_dim, self.obs_dim, self.act_dim
        if name == "archive.npz":
            cap = self.cells
            widths = {"solution": (self.genome_dim,), "measures": (k,)}
        else:
            cap = self.replay_capacity
            widths = {"obs": (obs,), "next_obs": (obs,), "action": (act,), "reward": (1 + k,),
                      "terminated": ()}
            if member not in widths:
                return f"is not one of the replay's fields {list(REPLAY_FIELDS)}"
        want = widths.get(member, ())
        if len(shape) != 1 + len(want) or tuple(shape[1:]) != want:
            return f"has shape {shape}; {('n', *want)} expected".replace("'n'", "n")
        if shape[0] > cap:
            return f"holds {shape[0]} rows; this config allows at most {cap}"
        if rows is not None and shape[0] != rows:
            return f"holds {shape[0]} rows, the file's other fields {rows}"
        return None


# -- files ---------------------------------------------------------------------------


def open_regular(path: Path, name: str, size: int | None = None, limit: int | None = None):
    """Opens ``path/name`` for reading: a regular file, not a symlink, of
    ``size`` bytes (if given) and at most ``limit`` bytes (if given)."""
    f = path / name
    try:
        st = os.lstat(f)
    except FileNotFoundError:
        fail(path, name, "file is missing")
    except OSError as err:
        fail(path, name, f"cannot be read ({err.strerror})")
    if stat.S_ISLNK(st.st_mode):
        fail(path, name, f"is a symbolic link (to {os.readlink(f)}); a checkpoint holds "
                         "only regular files")
    if not stat.S_ISREG(st.st_mode):
        fail(path, name, "is not a regular file")
    if limit is not None and st.st_size > limit:
        fail(path, name, f"is {st.st_size} bytes; at most {limit} are expected")
    if size is not None and st.st_size != size:
        fail(path, name, f"is {st.st_size} bytes, the manifest says {size} (corrupted)")
    try:
        fd = os.open(f, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        fail(path, name, f"cannot be opened ({err.strerror})")
    fo = os.fdopen(fd, "rb")
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        fo.close()
        fail(path, name, "changed while it was opened")
    return fo


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def json_depth(raw: bytes) -> int:
    """The nesting depth of JSON text, without recursion (strings skipped)."""
    stripped = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    if stripped.size == 0:
        return 0
    step = (np.isin(stripped, (ord("["), ord("{"))).astype(np.int32)
            - np.isin(stripped, (ord("]"), ord("}"))))
    return int(np.cumsum(step).max(initial=0))


def read_json(path: Path, name: str, size: int | None = None,
               limit: int = MAX_JSON_BYTES):
    with open_regular(path, name, size, limit) as fo:
        raw = fo.read(limit + 1)
    if len(raw) > limit:
        fail(path, name, f"is over {limit} bytes")
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        fail(path, name, f"JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} "
                         "are expected")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError
        fail(path, name, f"unreadable JSON ({type(err).__name__}: {err})"[:500])


def read_npz(path: Path, name: str, limits: Limits, size: int | None = None,
              kinds: str = _NUMERIC) -> dict[str, np.ndarray]:
    """Reads an npz after checking every member's .npy header: name, dtype,
    shape against :class:`Limits`, and the declared size against the header.
    Nothing is allocated for a member before all members have passed."""
    with open_regular(path, name, size, limits.file_bytes(name)) as fo:
        try:
            with zipfile.ZipFile(fo) as zf:
                infos = zf.infolist()
                if len(infos) > MAX_NPZ_MEMBERS:
                    fail(path, name, f"holds {len(infos)} arrays; at most "
                                     f"{MAX_NPZ_MEMBERS} are expected")
                names = [i.filename for i in infos]
                if len(set(names)) != len(names):
                    fail(path, name, "names an array twice")
                plan, total, rows = [], 0, None
                for info in infos:
                    member = info.filename
                    key = member[:-4]
                    if not member.endswith(".npy") or not key.isidentifier():
                        fail(path, name, f"member {member!r} is not an array of the format")
                    _stored(path, name, info, fo)
                    with zf.open(info) as mf:
                        dtype, shape, offset = _npy_header(path, name, member, mf, kinds)
                    count = math.prod(shape)
                    nbytes = count * dtype.itemsize
                    where = f"array {key!r} ({dtype} {shape}, {fmt(nbytes)})"
                    if name == "coordinator.npz" and nbytes > limits.coordinator_member_bytes:
                        fail(path, name, f"{where} is larger than any array this config "
                             f"stores (at most {fmt(limits.coordinator_member_bytes)})")
                    total += nbytes
                    if total > limits.data_bytes(name):
                        fail(path, name, f"{where} brings the file's arrays over the "
                             f"{fmt(limits.data_bytes(name))} this config allows")
                    why = limits.member(name, key, shape, rows)
                    if why:
                        fail(path, name, f"array {key!r} {why}")
                    rows = shape[0] if shape and name != "coordinator.npz" else rows
                    if info.file_size != offset + nbytes:
                        fail(path, name, f"{where} declares {info.file_size} bytes in the "
                             f"zip, its header {offset + nbytes} (corrupted or crafted)")
                    plan.append((key, info))
                if name == "replay.npz" and sorted(k for k, _ in plan) != sorted(REPLAY_FIELDS):
                    fail(path, name, f"holds {sorted(k for k, _ in plan)}, not the replay's "
                         f"fields {sorted(REPLAY_FIELDS)}")
                out = {}
                for key, info in plan:
                    with zf.open(info) as mf:
                        out[key] = np.lib.format.read_array(mf, allow_pickle=False)
                return out
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
            fail(path, name, f"unreadable ({type(err).__name__}: {err})"[:500])


def _stored(path: Path, name: str, info: zipfile.ZipInfo, fo) -> None:
    """A zip member stored as is (how numpy and torch write them), within the
    file: what it declares is on disk, so reading it allocates no more than the
    file's own size, whatever the config allows (no zip bomb)."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size \
            or info.header_offset + info.file_size > os.fstat(fo.fileno()).st_size:
        fail(path, name, f"member {info.filename!r} is compressed or larger than the file "
                         f"({info.file_size} bytes declared); the format stores members as is")


def _npy_header(path: Path, name: str, member: str, mf, kinds: str):
    """(dtype, shape, data offset) of a .npy stream, refusing what is not numeric."""
    try:
        version = np.lib.format.read_magic(mf)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            fail(path, name, f"member {member!r} has .npy version {version}")
        shape, _, dtype = read(mf, max_header_size=10_000)
    except CheckpointError:
        raise
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        fail(path, name, f"member {member!r} has an unreadable .npy header ({err})"[:500])
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None \
            or dtype.kind not in kinds:
        fail(path, name, f"array {member[:-4]!r} has dtype {dtype}; only numeric arrays "
                         f"(kinds {kinds!r}) are stored")
    if not all(type(n) is int and n >= 0 for n in shape):
        fail(path, name, f"array {member[:-4]!r} has a malformed shape {shape}")
    return dtype, tuple(shape), mf.tell()


def fmt(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""  # unreachable


def sha256(fo) -> str:
    h = hashlib.sha256()
    for block in iter(lambda: fo.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def read_archive(path: Path, limits: Limits, size: int | None) -> dict[str, np.ndarray]:
    """``archive.npz``: one elite per cell, cells in range."""
    archive = read_npz(path, "archive.npz", limits, size)
    index = archive.get("index")
    if index is not None and len(index):
        if index.dtype.kind not in "iu" or index.min() < 0 or index.max() >= limits.cells:
            fail(path, "archive.npz", f"cell index out of range [0, {limits.cells})")
        if len(np.unique(index)) != len(index):
            fail(path, "archive.npz", f"{len(index)} elites in {len(np.unique(index))} "
                                      "cells; an archive holds one elite per cell")
    return archive


def load_learner(path: Path, name: str, size: int, limits: Limits) -> dict:
    """A torch zip whose members fit the config's learner size, loaded weights-only."""
    with open_regular(path, name, size, limits.file_bytes(name)) as fo:
        try:
            with zipfile.ZipFile(fo) as zf:
                infos = zf.infolist()
                total = sum(i.file_size for i in infos)
                for info in infos:
                    _stored(path, name, info, fo)
            if len(infos) > MAX_NPZ_MEMBERS or total > limits.file_bytes(name):
                fail(path, name, f"declares {len(infos)} records of {fmt(total)}; "
                     f"this config's learners hold at most {fmt(limits.data_bytes(name))}")
            fo.seek(0)
            import torch

            return torch.load(fo, weights_only=True, map_location="cpu")
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - torch raises many kinds on a bad file
            fail(path, name, f"unreadable ({type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})")
