"""The compiled step of the QD locomotion environments (``_bullet_step``).

``QDLocomotionEnv`` steps through :class:`_bullet_step.Stepper` when this
module can attach it to the pybullet that Python loaded, and through pybullet's
Python API otherwise; both give the same observations bit for bit (the env
checks it once per robot it loads). ``DQD_RAY_COMPILED_STEP=0`` turns the
compiled step off.

The C module calls pybullet's exported C API on pybullet's own clients. Those
clients live in a file-local table of pybullet's extension; its offset comes
from the extension's ELF symbol table, read here once per process. Nothing is
guessed: without that symbol (a stripped or different build), or with a build
whose state does not match the Python path's, the env falls back and says why
in :func:`status`.
"""

from __future__ import annotations

import os
import struct
import warnings

import numpy as np

_TABLE_SYMBOL = b"sPhysicsClients1"
_state: dict = {}


def _symbol(path: str, name: bytes) -> tuple[int, int]:
    """(value, size) of a symbol in an ELF64 little-endian file's ``.symtab``."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise RuntimeError(f"{path} is not a 64-bit little-endian ELF file")
        shoff = struct.unpack_from("<Q", head, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
        symtabs = [s for s in sections if s[1] == 2]  # SHT_SYMTAB
        if not symtabs:
            raise RuntimeError(f"{path} has no symbol table (a stripped build)")
        sym = symtabs[0]
        strtab = sections[sym[6]]
        f.seek(strtab[4])
        strings = f.read(strtab[5])
        at = strings.find(b"\0" + name + b"\0")
        if at < 0:
            raise RuntimeError(f"{path} has no symbol {name.decode()}")
        f.seek(sym[4])
        data = f.read(sym[5])
    entries = np.frombuffer(data, dtype=np.dtype([
        ("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
        ("value", "<u8"), ("size", "<u8")]))
    hits = entries[(entries["name"] == at + 1) & ((entries["info"] & 0xF) == 1)]  # STT_OBJECT
    if len(hits) != 1:
        raise RuntimeError(f"{path}: {len(hits)} data symbols named {name.decode()}")
    return int(hits[0]["value"]), int(hits[0]["size"])


def _attach():
    """The attached C module, or None; the reason is kept for :func:`status`."""
    if "module" in _state:
        return _state["module"]
    module, reason = None, None
    if os.environ.get("DQD_RAY_COMPILED_STEP", "1") == "0":
        reason = "turned off by DQD_RAY_COMPILED_STEP=0"
    else:
        try:
            import pybullet

            from dqd_ray.envs import _bullet_step

            offset, size = _symbol(pybullet.__file__, _TABLE_SYMBOL)
            if size <= 0 or size % 8:
                raise RuntimeError(f"unexpected size {size} of pybullet's client table")
            _bullet_step.attach(pybullet.__file__, offset, size)
            module = _bullet_step
        except ImportError as e:
            reason = (f"the C extension is not built ({e}); `make install` (pip install -e .) "
                      "builds it with the system's C compiler")
        except (OSError, RuntimeError) as e:
            reason = f"pybullet's extension cannot be attached: {e}"
    _state["module"], _state["reason"] = module, reason
    if module is None and not reason.startswith("turned off"):
        warnings.warn(f"dqd-ray: environments step through pybullet's Python API: {reason}",
                      RuntimeWarning, stacklevel=3)
    return module


def status() -> dict:
    """Whether environments step in C here, and if not, why."""
    module = _attach()
    return {"compiled": module is not None, "reason": _state.get("reason")}


def make_stepper(env):
    """A :class:`_bullet_step.Stepper` for a loaded ``QDLocomotionEnv``, or None.

    The caller checks it against the Python path before using it.
    """
    module = _attach()
    if module is None:
        return None
    import pybullet

    r = env._robot
    joint_u = [pybullet.getJointInfo(r.body, j, physicsClientId=r.client)[4]
               for j in env._joint_list]
    return module.Stepper(
        r.client, r.body, r.floor, pybullet.TORQUE_CONTROL, env._joint_list, joint_u,
        env._joint_mid, env._joint_half, r.torque_scale.tolist(), env._part_list,
        r.base_is_part, r.torso_link, list(r.feet_links), env._joint_speeds,
        env._feet_contact, env._feet_prev,
    )


def fall_back(reason: str) -> None:
    """Turns the compiled step off for this process, with a warning."""
    _state["module"], _state["reason"] = None, reason
    warnings.warn(f"dqd-ray: environments step through pybullet's Python API: {reason}",
                  RuntimeWarning, stacklevel=3)
