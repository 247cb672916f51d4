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
  "attrs": {...}}``;
- attributes declared :func:`transient` (a value that is spent, such as the
  batch a pyribs scheduler asked for and has already been told about) as
  ``{"__fresh__": true}``, like the code-owned values below.

Functions, classes, modules and dtypes are not stored: they belong to the
code, and on restore the value of a freshly built object is kept. Anything
else is an error at save time, naming the attribute.

:func:`restore` overlays such a tree onto a freshly built object of the same
configuration, and checks the whole tree before it assigns anything:

- on its own (:func:`validate`): known node kinds, allowlisted classes,
  numeric arrays present, no dunder attribute names, bounded depth, archive
  stores with one elite per cell, in range, one row per elite;
- against the fresh object (:func:`check_fits`): only attributes the fresh
  object has, values of the same nature, arrays of the same dtype family and
  shape (or the declared :class:`ArraySpec` where the fresh value is empty),
  stores of the same capacity, fields and dtypes.

Any mismatch raises :class:`StateError` naming the attribute path. The only
objects it creates are instances of allowlisted classes where the fresh value
is ``None``, made with ``cls.__new__`` and filled with plain data.
"""

from __future__ import annotations

import inspect
import numbers
import types
from typing import Any, NamedTuple

import numpy as np


class StateError(ValueError):
    """A state tree that cannot be saved or restored, with the attribute path."""


_ALLOWED: dict[str, type] = {}
_LATER: list = []  # declarations that import their classes when first needed


def allow(*classes: type) -> None:
    """Adds classes to the allowlist (by module and qualified name)."""
    for cls in classes:
        _ALLOWED[f"{cls.__module__}.{cls.__qualname__}"] = cls


def allow_old_name(name: str, cls: type) -> None:
    """Keeps a class that moved on the allowlist under its old ``module.Name`` too,
    so checkpoints written before the move still load (as ``cls``)."""
    _ALLOWED[name] = cls


def allow_later(declare) -> None:
    """``declare()`` calls :func:`allow` and :func:`expect` the first time the
    allowlist is needed (so that declaring costs no import of pyribs)."""
    _LATER.append(declare)


def _declared() -> None:
    while _LATER:
        _LATER.pop(0)()


_TRANSIENT: dict[str, dict[str, Any]] = {}


def transient(cls: type, name: str, when=None) -> None:
    """Attribute ``name`` of ``cls`` is not stored (``when(obj)``, if given,
    says whether it is spent on this object): on restore the freshly built
    object's value stays. For values that belong to one step only, e.g. the
    solutions a scheduler asked for, once it has been told about them."""
    _TRANSIENT.setdefault(f"{cls.__module__}.{cls.__qualname__}", {})[name] = when


def allowed_names() -> list[str]:
    _declared()
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
    tree, arrays, pending = encode_deferred(obj, defer=False)
    return tree, arrays


class DeferredStores:
    """The archive cells an :func:`encode_deferred` left to copy later.

    ``finish()`` copies them into the ``arrays`` the encode returned, which are
    then exactly :func:`encode`'s. The stores must not change in between (an
    archive add does): ``finish`` checks each store's update counters and
    raises if one moved, rather than mixing two states.
    """

    def __init__(self, arrays: dict[str, Any]):
        self.arrays = arrays
        self.jobs: list[tuple[str, Any, str, np.ndarray, list[int]]] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def finish(self) -> dict[str, np.ndarray]:
        for key, store, field, order, updates in self.jobs:
            now = [int(u) for u in store._props["updates"]]
            if now != updates:
                raise StateError(
                    f"an archive changed between the capture of a checkpoint and the copy "
                    f"of its cells (update counters {updates} -> {now}); this checkpoint "
                    "would mix two states and is not written")
            self.arrays[key] = np.asarray(store._fields[field])[order]
        self.jobs = []
        return self.arrays


def encode_deferred(obj: Any, defer: bool = True) -> tuple[Any, dict, DeferredStores]:
    """:func:`encode`, with the cells of every pyribs store left to copy later.

    Everything else (RNG states, counters, emitter and CMA-ES state: small) is
    copied now. Returns ``(tree, arrays, pending)``: ``pending.finish()``, called
    before any store changes, fills the reserved keys of ``arrays``. This is
    how a role captures its state in milliseconds and copies its archive while
    its next evaluations run.
    """
    _declared()
    arrays: dict[str, np.ndarray] = {}
    seen: dict[int, str] = {}
    pending = DeferredStores(arrays)
    tree = _enc(obj, "root", arrays, seen, pending if defer else None)
    return tree, arrays, pending


def _array(value: np.ndarray, path: str, arrays: dict) -> dict:
    if value.dtype.kind not in _NUMERIC_KINDS:
        raise StateError(f"{path}: array of dtype {value.dtype} cannot be saved")
    key = f"a{len(arrays)}"
    arrays[key] = np.array(value)  # a copy: the live object keeps changing
    return {"__array__": key}


def _enc(obj, path: str, arrays: dict, seen: dict, pending: DeferredStores | None = None):
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
        return {kind: [_enc(v, f"{path}[{i}]", arrays, seen, pending) for i, v in enumerate(obj)]}
    if type(obj) is dict:
        if not all(isinstance(k, str) for k in obj):
            raise StateError(f"{path}: dict keys must be strings to be saved")
        return {"__dict__": {k: _enc(v, f"{path}.{k}", arrays, seen, pending)
                             for k, v in obj.items()}}
    if id(obj) in seen:  # a shared object (e.g. the archive every emitter holds)
        return {"__ref__": seen[id(obj)]}
    seen[id(obj)] = path
    if _is_store(obj):
        return _enc_store(obj, path, arrays, pending)
    name = _class_name(obj)
    if name not in _ALLOWED:
        raise StateError(f"{path}: objects of type {name} are not in the checkpoint allowlist")
    attrs = getattr(obj, "__dict__", None)
    if attrs is None:
        raise StateError(f"{path}: {name} has no attribute dict")
    spent = {k for k, when in _TRANSIENT.get(name, {}).items()
             if k in attrs and (when is None or when(obj))}
    return {"__object__": name,
            "attrs": {k: {"__fresh__": True} if k in spent else
                      _enc(v, f"{path}.{k}", arrays, seen, pending)
                      for k, v in attrs.items()}}


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


def _enc_store(store, path: str, arrays: dict, pending: DeferredStores | None = None) -> dict:
    """A pyribs ArrayStore as its occupied cells, in occupancy order (with
    ``pending``: their keys reserved, the copy left to ``pending.finish()``)."""
    props = store._props
    n = int(props["n_occupied"])
    order = np.array(props["occupied_list"][:n])
    updates = [int(u) for u in props["updates"]]
    order_node = _array(order, f"{path}.order", arrays)
    fields = {}
    for k, v in store._fields.items():
        if pending is None:
            fields[k] = _array(np.asarray(v)[order], f"{path}.{k}", arrays)
            continue
        if np.asarray(v).dtype.kind not in _NUMERIC_KINDS:
            raise StateError(f"{path}.{k}: array of dtype {np.asarray(v).dtype} cannot be saved")
        key = f"a{len(arrays)}"
        arrays[key] = None  # reserved: filled by pending.finish()
        pending.jobs.append((key, store, k, order, updates))
        fields[k] = {"__array__": key}
    return {
        "__store__": {
            "capacity": int(props["capacity"]),
            "updates": updates,
            "order": order_node,
            "fields": fields,
        }
    }


# -- restore -----------------------------------------------------------------------

#: Deepest state tree accepted (a real coordinator's is about 15 levels).
MAX_DEPTH = 100

#: Bit generators a ``__generator__`` node may name.
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")

#: Keys each node kind may hold (the first one names the kind).
_NODE_KEYS = {"__array__": {"__array__", "scalar"}, "__object__": {"__object__", "attrs"}}

#: dtype kinds that may stand in for each other ("the same dtype"): pyribs' CMA-ES
#: starts in the archive's dtype (float32) and continues in float64 after a tell.
_KIND_FAMILY = {"f": "f", "i": "i", "u": "i", "b": "b", "c": "c"}


class ArraySpec(NamedTuple):
    """What an attribute that is ``None`` (or ``[]``) on a freshly built object may hold.

    Attributes:
        kinds: Allowed dtype kinds (``"f"``, ``"b"``, ...).
        shape: One entry per axis: ``None`` (any length), an int, or the name
            of an int attribute of the same (fresh) object, e.g. ``"_solution_dim"``.
    """

    kinds: str
    shape: tuple


_SPECS: dict[str, dict[str, ArraySpec]] = {}


def expect(cls: type, **specs: ArraySpec) -> None:
    """Declares the arrays that attributes of ``cls`` hold once the object is
    used but not when it is built (``None`` or ``[]`` on a fresh object)."""
    _SPECS.setdefault(f"{cls.__module__}.{cls.__qualname__}", {}).update(specs)


def restore(fresh: Any, tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Overlays ``tree`` (from :func:`encode`) onto ``fresh``; returns the result.

    Everything is checked before anything is assigned: the tree on its own
    (:func:`validate`), then against ``fresh`` (:func:`check_fits`).

    Raises:
        StateError: The tree names a class outside the allowlist, holds an
            unknown node, or does not fit the fresh object (another config).
    """
    validate(tree, arrays)
    check_fits(fresh, tree, arrays)
    return _dec(fresh, tree, arrays, "root")


def check_fits(fresh: Any, tree: Any, arrays: dict[str, np.ndarray]) -> None:
    """Checks a validated tree against the fresh object it will be restored
    onto, changing nothing (see :func:`dqd_ray.state.statefit.check_fits`)."""
    from dqd_ray.state.statefit import check_fits as fits

    fits(fresh, tree, arrays)


def validate(tree: Any, arrays: dict[str, np.ndarray]) -> None:
    """Checks a whole tree on its own: allowlisted types, known nodes, numeric
    arrays present, no dunder attribute names, at most :data:`MAX_DEPTH` deep.

    Raises:
        StateError: Naming the first offending node.
    """
    _declared()
    try:
        _check(tree, arrays, "root", 0)
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as err:
        raise StateError(f"malformed state tree ({type(err).__name__}: {err})") from None


def _kind(node) -> str:
    return next(iter(node))


def _check(node, arrays: dict, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise StateError(f"{path[:60]}...: state tree nested deeper than {MAX_DEPTH} levels")
    if node is None or isinstance(node, (bool, str, int)):
        return
    if isinstance(node, list):
        raise StateError(f"{path}: bare list in state tree")
    if not isinstance(node, dict) or len(node) == 0:
        raise StateError(f"{path}: malformed state node {type(node).__name__}")
    kind = _kind(node)
    extra = set(node) - _NODE_KEYS.get(kind, {kind})
    if extra:
        raise StateError(f"{path}: unexpected keys {sorted(extra)} in a {kind} node")
    if kind == "__array__":
        key = node["__array__"]
        if not isinstance(key, str) or key not in arrays:
            raise StateError(f"{path}: array {key!r} missing from the checkpoint")
        arr = arrays[key]
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in _NUMERIC_KINDS \
                or arr.dtype.fields is not None or arr.dtype.subdtype is not None:
            raise StateError(f"{path}: array {key!r} has dtype "
                             f"{getattr(arr, 'dtype', type(arr).__name__)}; only numeric "
                             "and boolean arrays are restored")
        if node.get("scalar", False) not in (True, False) or node.get("scalar") and arr.ndim:
            raise StateError(f"{path}: array {key!r} marked scalar has shape {arr.shape}")
    elif kind == "__float__":
        if not isinstance(node["__float__"], str):
            raise StateError(f"{path}: a __float__ node holds a {type(node['__float__']).__name__}")
        float(node["__float__"])
    elif kind == "__fresh__":
        pass
    elif kind == "__ref__":
        if not isinstance(node["__ref__"], str):
            raise StateError(f"{path}: a __ref__ node must hold an attribute path")
    elif kind == "__generator__":
        state = node["__generator__"]
        if not isinstance(state, dict) or state.get("bit_generator") not in _BIT_GENERATORS:
            raise StateError(f"{path}: generator state names no known bit generator")
    elif kind in ("__list__", "__tuple__"):
        if not isinstance(node[kind], list):
            raise StateError(f"{path}: a {kind} node must hold a list")
        for i, v in enumerate(node[kind]):
            _check(v, arrays, f"{path}[{i}]", depth + 1)
    elif kind == "__dict__":
        if not isinstance(node[kind], dict):
            raise StateError(f"{path}: a __dict__ node must hold a mapping")
        for k, v in node[kind].items():
            _check(v, arrays, f"{path}.{k}", depth + 1)
    elif kind == "__object__":
        if node["__object__"] not in _ALLOWED:
            raise StateError(f"{path}: type {node['__object__']!r} is not in the checkpoint "
                             "allowlist; refusing to load it")
        if not isinstance(node["attrs"], dict):
            raise StateError(f"{path}: an object's attrs must be a mapping")
        for k, v in node["attrs"].items():
            if not k.isidentifier() or k.startswith("__"):
                raise StateError(f"{path}: refusing attribute {k!r}: only plain attribute "
                                 "names are restored (no dunder names)")
            _check(v, arrays, f"{path}.{k}", depth + 1)
    elif kind == "__store__":
        st = node["__store__"]
        if set(st) != {"capacity", "updates", "order", "fields"}:
            raise StateError(f"{path}: malformed archive store {sorted(st)}")
        if not isinstance(st["capacity"], int) or not isinstance(st["updates"], list) or \
                not all(type(u) is int for u in st["updates"]):
            raise StateError(f"{path}: malformed archive store counters")
        if not isinstance(st["fields"], dict):
            raise StateError(f"{path}: malformed archive store fields")
        for key in ("order", *st["fields"]):
            ref = st["order"] if key == "order" else st["fields"][key]
            if not isinstance(ref, dict) or _kind(ref) != "__array__":
                raise StateError(f"{path}.{key}: an archive field must be an array")
            _check(ref, arrays, f"{path}.{key}", depth + 1)
        _check_cells(st, arrays, path)
    else:
        raise StateError(f"{path}: unknown state node kind {kind!r}")


def _check_cells(st: dict, arrays: dict, path: str) -> None:
    """An archive store on its own: one elite per cell, cells in range, and
    one row per elite in every field."""
    order, capacity = arrays[st["order"]["__array__"]], st["capacity"]
    if order.dtype.kind not in "iu" or order.ndim != 1:
        raise StateError(f"{path}.order: cell indices of {order.dtype} {order.shape}")
    n = len(order)
    if n > capacity or n and (int(order.min()) < 0 or int(order.max()) >= capacity):
        raise StateError(f"{path}.order: cell index out of range [0, {capacity})")
    repeated = n - len(np.unique(order))
    if repeated:
        raise StateError(f"{path}.order: {n} elites in {n - repeated} cells; an archive "
                         "holds one elite per cell")
    for name, ref in st["fields"].items():
        values = arrays[ref["__array__"]]
        if values.ndim == 0 or len(values) != n:
            raise StateError(f"{path}.{name}: {values.shape} in the checkpoint, not one "
                             f"row for each of the {n} elites")


# -- does the tree fit the fresh object? ---------------------------------------------


def _attr(obj, name: str):
    """(known, value): whether ``obj`` has attribute ``name`` as data, and its value."""
    d = getattr(obj, "__dict__", {})
    if name in d:
        return True, d[name]
    static = inspect.getattr_static(type(obj), name, _MISSING)
    if static is _MISSING or callable(static) or isinstance(
            static, (property, types.MemberDescriptorType, types.GetSetDescriptorType,
                     staticmethod, classmethod)):
        return False, None
    return True, static


_MISSING = object()



def _dec(fresh, node, arrays: dict, path: str):
    if node is None or isinstance(node, (bool, str, int)):
        return node
    kind = _kind(node)
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
        gen = fresh if isinstance(fresh, np.random.Generator) else np.random.Generator(
            getattr(np.random, node["__generator__"]["bit_generator"])())
        gen.bit_generator.state = node["__generator__"]
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
        _restore_store(fresh, node["__store__"], arrays)
        return fresh
    # __object__: the fresh object (same class, checked), or a new one where it was None.
    cls = _ALLOWED[node["__object__"]]
    obj = fresh if type(fresh) is cls else cls.__new__(cls)
    for k, v in node["attrs"].items():
        # object.__setattr__ also fills frozen dataclasses (pyribs' ArchiveStats).
        object.__setattr__(obj, k, _dec(_attr(obj, k)[1], v, arrays, f"{path}.{k}"))
    return obj


def _restore_store(store, st: dict, arrays: dict) -> None:
    """Fills a store checked whole by :func:`_fits_store`."""
    props = store._props
    order = np.asarray(arrays[st["order"]["__array__"]], np.int64)
    n = len(order)
    props["occupied"][:] = False
    props["occupied"][order] = True
    props["occupied_list"][:n] = order
    props["n_occupied"] = n
    props["updates"] = [int(u) for u in st["updates"]]
    for name, ref in st["fields"].items():
        store._fields[name][order] = arrays[ref["__array__"]]
