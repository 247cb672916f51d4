"""State of live objects as JSON plus arrays, restored without running stored code.

A checkpoint must never execute anything it contains, so the coordinator's
state (pyribs archives, emitters, CMA-ES, RNGs, counters) is not pickled.
:func:`encode` walks an object's attributes and writes

- numbers, strings, booleans, None, lists, tuples and string-keyed dicts as JSON;
- numpy arrays (numeric or boolean dtypes only) into a separate dict of arrays;
- numpy random generators as their bit generator's state (JSON);
- pyribs archive stores as their *occupied* cells only, so the size grows with
  the elites, not with the grid;
- objects of the classes in an explicit allowlist as ``{"__object__": name,
  "attrs": {...}}``.

Functions, classes, modules and dtypes are not stored: they belong to the
code, and on restore the value of a freshly built object is kept. Anything
else is an error at save time, naming the attribute.

:func:`restore` overlays such a tree onto a freshly built object of the same
configuration. A node naming a class outside the allowlist, an unknown node
kind or a malformed value raises :class:`StateError` before anything is
assigned; the only objects it creates are instances of allowlisted classes,
made with ``cls.__new__`` and filled with plain data.
"""

from __future__ import annotations

import numbers
import types
from typing import Any

import numpy as np


class StateError(ValueError):
    """A state tree that cannot be saved or restored, with the attribute path."""


_ALLOWED: dict[str, type] = {}


def allow(*classes: type) -> None:
    """Adds classes to the allowlist (by module and qualified name)."""
    for cls in classes:
        _ALLOWED[f"{cls.__module__}.{cls.__qualname__}"] = cls


def allowed_names() -> list[str]:
    return sorted(_ALLOWED)


def _class_name(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


_NUMERIC_KINDS = set("biufc")
_SKIP = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
         type, np.dtype, staticmethod, classmethod)


def _is_store(obj) -> bool:
    from ribs.archives._array_store import ArrayStore

    return isinstance(obj, ArrayStore)


def encode(obj: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Returns ``(tree, arrays)``; ``tree`` is JSON-able, ``arrays`` go to an npz."""
    arrays: dict[str, np.ndarray] = {}
    seen: dict[int, str] = {}
    tree = _enc(obj, "root", arrays, seen)
    return tree, arrays


def _array(value: np.ndarray, path: str, arrays: dict) -> dict:
    if value.dtype.kind not in _NUMERIC_KINDS:
        raise StateError(f"{path}: array of dtype {value.dtype} cannot be saved")
    key = f"a{len(arrays)}"
    arrays[key] = np.array(value)  # a copy: the live object keeps changing
    return {"__array__": key}


def _enc(obj, path: str, arrays: dict, seen: dict):
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.ndarray):
        return _array(obj, path, arrays)
    if isinstance(obj, (np.generic,)):
        return _array(np.asarray(obj), path, arrays) | {"scalar": True}
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return {"__float__": repr(float(obj))}
    if isinstance(obj, _SKIP) or callable(obj) and not hasattr(obj, "__dict__"):
        return {"__fresh__": True}
    if isinstance(obj, np.random.Generator):
        return {"__generator__": _plain_json(obj.bit_generator.state, path)}
    if isinstance(obj, (list, tuple)):
        kind = "__list__" if isinstance(obj, list) else "__tuple__"
        return {kind: [_enc(v, f"{path}[{i}]", arrays, seen) for i, v in enumerate(obj)]}
    if type(obj) is dict:
        if not all(isinstance(k, str) for k in obj):
            raise StateError(f"{path}: dict keys must be strings to be saved")
        return {"__dict__": {k: _enc(v, f"{path}.{k}", arrays, seen) for k, v in obj.items()}}
    if id(obj) in seen:  # a shared object (e.g. the archive every emitter holds)
        return {"__ref__": seen[id(obj)]}
    seen[id(obj)] = path
    if _is_store(obj):
        return _enc_store(obj, path, arrays)
    name = _class_name(obj)
    if name not in _ALLOWED:
        raise StateError(f"{path}: objects of type {name} are not in the checkpoint allowlist")
    attrs = getattr(obj, "__dict__", None)
    if attrs is None:
        raise StateError(f"{path}: {name} has no attribute dict")
    return {"__object__": name,
            "attrs": {k: _enc(v, f"{path}.{k}", arrays, seen) for k, v in attrs.items()}}


def _plain_json(x, path: str):
    if isinstance(x, dict):
        return {str(k): _plain_json(v, path) for k, v in x.items()}
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x)
    raise StateError(f"{path}: generator state holds a {type(x).__name__}")


def _enc_store(store, path: str, arrays: dict) -> dict:
    """A pyribs ArrayStore as its occupied cells, in occupancy order."""
    props = store._props
    n = int(props["n_occupied"])
    order = np.asarray(props["occupied_list"][:n])
    return {
        "__store__": {
            "capacity": int(props["capacity"]),
            "updates": [int(u) for u in props["updates"]],
            "order": _array(order, f"{path}.order", arrays),
            "fields": {k: _array(np.asarray(v)[order], f"{path}.{k}", arrays)
                       for k, v in store._fields.items()},
        }
    }


# -- restore -----------------------------------------------------------------------


def restore(fresh: Any, tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Overlays ``tree`` (from :func:`encode`) onto ``fresh``; returns the result.

    Raises:
        StateError: The tree names a class outside the allowlist, holds an
            unknown node, or does not fit the fresh object (another config).
    """
    validate(tree, arrays)  # everything, before touching anything
    return _dec(fresh, tree, arrays, "root")


def validate(tree: Any, arrays: dict[str, np.ndarray]) -> None:
    """Checks a whole tree (allowlisted types, known nodes, arrays present).

    Raises:
        StateError: Naming the first offending node.
    """
    try:
        _check(tree, arrays, "root")
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as err:
        raise StateError(f"malformed state tree ({type(err).__name__}: {err})") from None


def _check(node, arrays: dict, path: str) -> None:
    if node is None or isinstance(node, (bool, str, int)):
        return
    if isinstance(node, list):
        raise StateError(f"{path}: bare list in state tree")
    if not isinstance(node, dict) or len(node) == 0:
        raise StateError(f"{path}: malformed state node {type(node).__name__}")
    kind = next(iter(node))
    if kind == "__array__":
        if node["__array__"] not in arrays:
            raise StateError(f"{path}: array {node['__array__']!r} missing from the checkpoint")
    elif kind == "__float__":
        float(node["__float__"])
    elif kind in ("__fresh__", "__ref__", "__generator__"):
        pass
    elif kind in ("__list__", "__tuple__"):
        for i, v in enumerate(node[kind]):
            _check(v, arrays, f"{path}[{i}]")
    elif kind == "__dict__":
        for k, v in node[kind].items():
            _check(v, arrays, f"{path}.{k}")
    elif kind == "__object__":
        if node["__object__"] not in _ALLOWED:
            raise StateError(f"{path}: type {node['__object__']!r} is not in the checkpoint "
                             "allowlist; refusing to load it")
        for k, v in node["attrs"].items():
            _check(v, arrays, f"{path}.{k}")
    elif kind == "__store__":
        st = node["__store__"]
        for key in ("order", *st["fields"]):
            ref = st["order"] if key == "order" else st["fields"][key]
            _check(ref, arrays, f"{path}.{key}")
    else:
        raise StateError(f"{path}: unknown state node kind {kind!r}")


def _dec(fresh, node, arrays: dict, path: str):
    if node is None or isinstance(node, (bool, str, int)):
        return node
    kind = next(iter(node))
    if kind == "__array__":
        arr = np.array(arrays[node["__array__"]])
        if node.get("scalar"):
            return arr[()]
        return arr
    if kind == "__float__":
        return float(node["__float__"])
    if kind in ("__fresh__", "__ref__"):
        return fresh
    if kind == "__generator__":
        gen = fresh if isinstance(fresh, np.random.Generator) else np.random.default_rng()
        try:
            gen.bit_generator.state = node["__generator__"]
        except (TypeError, ValueError, KeyError) as err:
            raise StateError(f"{path}: bad generator state ({err})") from None
        return gen
    if kind in ("__list__", "__tuple__"):
        items = node[kind]
        base = fresh if isinstance(fresh, (list, tuple)) and len(fresh) == len(items) else \
            [None] * len(items)
        out = [_dec(f, v, arrays, f"{path}[{i}]") for i, (f, v) in enumerate(zip(base, items))]
        return out if kind == "__list__" else tuple(out)
    if kind == "__dict__":
        base = fresh if isinstance(fresh, dict) else {}
        return {k: _dec(base.get(k), v, arrays, f"{path}.{k}") for k, v in node[kind].items()}
    if kind == "__store__":
        if fresh is None or not _is_store(fresh):
            raise StateError(f"{path}: an archive store has no counterpart in this configuration")
        _restore_store(fresh, node["__store__"], arrays, path)
        return fresh
    # __object__
    cls = _ALLOWED[node["__object__"]]
    obj = fresh if type(fresh) is cls else cls.__new__(cls)
    current = getattr(obj, "__dict__", {})
    for k, v in node["attrs"].items():
        # object.__setattr__ also fills frozen dataclasses (pyribs' ArchiveStats).
        object.__setattr__(obj, k, _dec(current.get(k), v, arrays, f"{path}.{k}"))
    return obj


def _restore_store(store, st: dict, arrays: dict, path: str) -> None:
    props = store._props
    if int(st["capacity"]) != int(props["capacity"]):
        raise StateError(f"{path}: archive has {props['capacity']} cells, the checkpoint "
                         f"{st['capacity']} (another archive shape?)")
    if set(st["fields"]) != set(store._fields):
        raise StateError(f"{path}: archive fields {sorted(store._fields)} differ from the "
                         f"checkpoint's {sorted(st['fields'])}")
    order = np.asarray(arrays[st["order"]["__array__"]], np.int64)
    if order.size and (order.min() < 0 or order.max() >= props["capacity"]):
        raise StateError(f"{path}: cell index out of range")
    n = len(order)
    props["occupied"][:] = False
    props["occupied"][order] = True
    props["occupied_list"][:n] = order
    props["n_occupied"] = n
    props["updates"] = [int(u) for u in st["updates"]]
    for name, ref in st["fields"].items():
        values = arrays[ref["__array__"]]
        target = store._fields[name]
        if values.shape[1:] != target.shape[1:]:
            raise StateError(f"{path}.{name}: shape {values.shape[1:]} in the checkpoint, "
                             f"{target.shape[1:]} here")
        target[order] = values
