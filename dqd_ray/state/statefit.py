"""Whether a validated state tree fits the freshly built object it will be
restored onto (:func:`check_fits`), checked before anything is assigned; the
rest of the codec is :mod:`dqd_ray.state.statecodec`."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from dqd_ray.state.statecodec import (
    _ALLOWED,
    _KIND_FAMILY,
    _SPECS,
    ArraySpec,
    StateError,
    _attr,
    _check_cells,
    _class_name,
    _declared,
    _is_store,
    _kind,
)


def check_fits(fresh: Any, tree: Any, arrays: dict[str, np.ndarray]) -> None:
    """Checks a validated tree against the freshly built object it will be
    restored onto, without changing anything:

    - an object node overlays an object of the same class, and names only
      attributes that object has (in its ``__dict__``, or as a plain class
      attribute); new objects are made only where the fresh value is ``None``;
    - a value replaces one of the same nature: a bool a bool, a number a
      number, a string a string, a dict a dict (with only the fresh dict's keys,
      when it has any), a generator a generator of the same bit generator;
    - an array replaces an array of the same dtype family (float, integer,
      bool) and the same shape, except that an array which starts empty along
      its first axis (a growing history) may have any length there; an array
      where the fresh value is ``None`` or ``[]`` must fit the attribute's
      :class:`ArraySpec` when one is declared (:func:`expect`);
    - ``None`` replaces only ``None``;
    - an archive store keeps its capacity, fields and dtypes, and its cells
      are unique and in range.

    Raises:
        StateError: Naming the attribute path and the mismatch.
    """
    _declared()
    _fits(fresh, tree, arrays, "root", None, None)


def _is_number(x) -> bool:
    return isinstance(x, (numbers.Number, np.number)) and not isinstance(x, (bool, np.bool_))


def _node_desc(node, arrays) -> str:
    if not isinstance(node, dict):
        name = type(node).__name__
        return "None" if node is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name} " \
            f"({node!r:.40})"
    if _kind(node) == "__array__":
        a = arrays[node["__array__"]]
        return f"an array of {a.dtype} {a.shape}"
    return f"a {_kind(node).strip('_')} node"


def _fits(fresh, node, arrays: dict, path: str, owner, spec: ArraySpec | None) -> None:
    kind = _kind(node) if isinstance(node, dict) else None
    if kind in ("__fresh__", "__ref__"):
        return  # keeps the fresh value
    if spec is not None and (fresh is None or isinstance(fresh, (list, tuple)) and not fresh):
        return _fits_spec(node, arrays, path, owner, spec)
    if fresh is None:
        return _fits_new(node, arrays, path)
    if node is None:
        raise StateError(f"{path}: None in the checkpoint where this object holds a "
                         f"{type(fresh).__name__}")
    desc = _node_desc(node, arrays)
    if isinstance(fresh, (bool, np.bool_)):
        if not (isinstance(node, bool) or kind == "__array__"
                and arrays[node["__array__"]].shape == () and
                arrays[node["__array__"]].dtype.kind == "b"):
            raise StateError(f"{path}: {desc} in place of a bool")
    elif isinstance(fresh, str):
        if not isinstance(node, str):
            raise StateError(f"{path}: {desc} in place of a string")
    elif isinstance(fresh, np.ndarray):
        if kind != "__array__":
            raise StateError(f"{path}: {desc} in place of an array of {fresh.dtype} "
                             f"{fresh.shape}")
        _fits_array(fresh, arrays[node["__array__"]], path)
    elif _is_number(fresh):
        ok = (isinstance(node, int) and not isinstance(node, bool) or kind == "__float__"
              or kind == "__array__" and arrays[node["__array__"]].ndim == 0
              and arrays[node["__array__"]].dtype.kind in "iufc")
        if not ok:
            raise StateError(f"{path}: {desc} in place of a number")
    elif isinstance(fresh, np.random.Generator):
        if kind != "__generator__":
            raise StateError(f"{path}: {desc} in place of a random generator")
        _fits_generator(fresh, node["__generator__"], path)
    elif _is_store(fresh):
        if kind != "__store__":
            raise StateError(f"{path}: {desc} in place of an archive store")
        _fits_store(fresh, node["__store__"], arrays, path)
    elif isinstance(fresh, (list, tuple)):
        if kind == "__array__":
            if arrays[node["__array__"]].dtype.kind not in "biufc":
                raise StateError(f"{path}: {desc} in place of a list")
            return
        if kind not in ("__list__", "__tuple__"):
            raise StateError(f"{path}: {desc} in place of a {type(fresh).__name__}")
        items = node[kind]
        base = fresh if len(fresh) == len(items) else [None] * len(items)
        for i, (f, v) in enumerate(zip(base, items)):
            _fits(f, v, arrays, f"{path}[{i}]", None, None)
    elif type(fresh) is dict:
        if kind != "__dict__":
            raise StateError(f"{path}: {desc} in place of a dict")
        unknown = set(node[kind]) - set(fresh) if fresh else set()
        if unknown:
            raise StateError(f"{path}: keys {sorted(unknown)} are not in this object's dict")
        for k, v in node[kind].items():
            _fits(fresh.get(k), v, arrays, f"{path}.{k}", None, None)
    elif _class_name(fresh) in _ALLOWED:
        if kind != "__object__":
            raise StateError(f"{path}: {desc} in place of a {_class_name(fresh)}")
        if _ALLOWED.get(node["__object__"]) is not type(fresh):
            raise StateError(f"{path}: a {node['__object__']} in place of a "
                             f"{_class_name(fresh)}")
        specs = _SPECS.get(_class_name(fresh), {})
        for k, v in node["attrs"].items():
            known, value = _attr(fresh, k)
            if not known:
                raise StateError(f"{path}: {_class_name(fresh)} has no attribute {k!r}; "
                                 "refusing to add it")
            _fits(value, v, arrays, f"{path}.{k}", fresh, specs.get(k))
    else:
        raise StateError(f"{path}: {desc} cannot be restored over a {_class_name(fresh)}")


def _fits_new(node, arrays: dict, path: str) -> None:
    """Where the fresh value is None: anything valid; objects are built new."""
    kind = _kind(node) if isinstance(node, dict) else None
    if kind in ("__list__", "__tuple__"):
        for i, v in enumerate(node[kind]):
            _fits(None, v, arrays, f"{path}[{i}]", None, None)
    elif kind == "__dict__":
        for k, v in node[kind].items():
            _fits(None, v, arrays, f"{path}.{k}", None, None)
    elif kind == "__object__":
        for k, v in node["attrs"].items():
            _fits(None, v, arrays, f"{path}.{k}", None, None)
    elif kind == "__generator__":
        _fits_generator(None, node["__generator__"], path)
    elif kind == "__store__":
        raise StateError(f"{path}: an archive store has no counterpart in this configuration")


def _fits_spec(node, arrays: dict, path: str, owner, spec: ArraySpec) -> None:
    kind = _kind(node) if isinstance(node, dict) else None
    if node is None or kind in ("__list__", "__tuple__") and not node[kind]:
        return
    if kind != "__array__":
        raise StateError(f"{path}: {_node_desc(node, arrays)} where an array of kind "
                         f"{spec.kinds!r} is expected")
    arr = arrays[node["__array__"]]
    want = []
    for dim in spec.shape:
        want.append(getattr(owner, dim, None) if isinstance(dim, str) else dim)
    if arr.dtype.kind not in spec.kinds or arr.ndim != len(want) or any(
            w is not None and int(w) != n for w, n in zip(want, arr.shape)):
        shape = ", ".join("*" if w is None else str(int(w)) for w in want)
        raise StateError(f"{path}: an array of {arr.dtype} {arr.shape} where an array of "
                         f"kind {spec.kinds!r} and shape ({shape}) is expected")


def _fits_array(fresh: np.ndarray, arr: np.ndarray, path: str) -> None:
    if _KIND_FAMILY.get(arr.dtype.kind) != _KIND_FAMILY.get(fresh.dtype.kind):
        raise StateError(f"{path}: an array of {arr.dtype} in place of one of {fresh.dtype}")
    growing = fresh.ndim >= 1 and fresh.shape[0] == 0
    if arr.shape != fresh.shape and not (growing and arr.ndim == fresh.ndim
                                         and arr.shape[1:] == fresh.shape[1:]):
        raise StateError(f"{path}: an array of shape {arr.shape} in place of one of "
                         f"shape {fresh.shape}")


def _fits_generator(fresh, state: dict, path: str) -> None:
    """Sets the state on a scratch generator of the same kind: any error now."""
    name = type(fresh.bit_generator).__name__ if fresh is not None else state["bit_generator"]
    if state["bit_generator"] != name:
        raise StateError(f"{path}: a {state['bit_generator']} state for a {name} generator")
    try:
        getattr(np.random, name)().state = state
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        raise StateError(f"{path}: bad generator state ({err})") from None


def _fits_store(store, st: dict, arrays: dict, path: str) -> None:
    """The whole store, before any of it is changed."""
    props = store._props
    capacity = int(props["capacity"])
    if st["capacity"] != capacity:
        raise StateError(f"{path}: archive has {capacity} cells, the checkpoint "
                         f"{st['capacity']} (another archive shape?)")
    if set(st["fields"]) != set(store._fields):
        raise StateError(f"{path}: archive fields {sorted(store._fields)} differ from the "
                         f"checkpoint's {sorted(st['fields'])}")
    if len(st["updates"]) != len(props["updates"]):
        raise StateError(f"{path}: archive update counters {st['updates']} do not fit")
    _check_cells(st, arrays, path)
    n = len(arrays[st["order"]["__array__"]])
    for name, ref in st["fields"].items():
        values, target = arrays[ref["__array__"]], store._fields[name]
        if values.shape != (n, *target.shape[1:]) or values.dtype != target.dtype:
            raise StateError(f"{path}.{name}: {values.dtype} {values.shape} in the "
                             f"checkpoint, {target.dtype} {(n, *target.shape[1:])} expected "
                             f"for {n} elites")


# -- restore (after every check) -----------------------------------------------------
