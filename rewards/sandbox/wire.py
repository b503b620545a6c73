"""The data format across the sandbox boundary: plain values as tagged JSON, nothing else.

Both directions use it (the test's arguments going in, the candidate's results coming
back). JSON is parsed by C code that builds only numbers, strings and containers; no
object made by the candidate, and no code of its choosing, can come out of ``decode``.
Lists stay JSON arrays; the other containers and bytes are one-key objects::

    (1, 2) -> {"t": [1, 2]}    {1} -> {"s": [1]}    frozenset() -> {"z": []}
    {"a": 1} -> {"d": [["a", 1]]}    b"\\x00" -> {"b": "\\u0000"}    1j -> {"c": [0.0, 1.0]}

``decode`` refuses what would make the *trusted* side burn time or memory: text over
``max_bytes``, nesting deeper than ``MAX_DEPTH``, integers over 4300 digits (Python's own
limit), and containers of numbers whose hashes collide (building a set or dict of them, or
calling ``set()`` on such a list, takes quadratic time). Standard library only: the
sandbox's zygote imports it too.
"""

from __future__ import annotations

import json
import math
from collections import Counter

MAX_DEPTH = 100
# Containers shorter than this are not checked for colliding hashes (too small to hurt).
_COLLISION_CHECK_FROM = 32
# Distinct values sharing one hash that a container may hold (legitimate: -1 and -2).
_MAX_SAME_HASH = 4
# Types whose hash does not depend on the process's random seed: a candidate can craft
# collisions for these only (str and bytes hashes are randomised per process).
_FIXED_HASH = (int, float, complex, bool, tuple, frozenset, type(None))


class WireError(ValueError):
    """Text that is not a well-formed, affordable value of this format."""


def encode(value) -> str:
    """JSON text for `value`; TypeError for anything that is not plain data."""
    return json.dumps(_tree(value, 0), ensure_ascii=False, separators=(",", ":"))


def _tree(value, depth: int):
    if depth > MAX_DEPTH:
        raise TypeError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [_tree(v, depth + 1) for v in value]
    if kind is tuple:
        return {"t": [_tree(v, depth + 1) for v in value]}
    if kind is set:
        return {"s": [_tree(v, depth + 1) for v in value]}
    if kind is frozenset:
        return {"z": [_tree(v, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[_tree(k, depth + 1), _tree(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"b": value.decode("latin-1")}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    raise TypeError(f"a {kind.__name__} is not plain data")


def decode(text: bytes | str, max_bytes: int = 1 << 20):
    """The value `text` encodes; WireError when it is malformed or too costly to hold."""
    if len(text) > max_bytes:
        raise WireError(f"more than {max_bytes} bytes")
    try:
        value = json.loads(text, object_hook=_untag, parse_constant=_constant)
    except WireError:
        raise
    except (ValueError, TypeError, RecursionError, MemoryError) as err:
        raise WireError(f"not a plain value: {type(err).__name__}: {str(err)[:200]}") from None
    _vet(value, 0)
    return value


def _constant(name: str) -> float:
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[name]


def _untag(obj: dict):
    if len(obj) != 1:
        raise WireError("an object with other than one tag")
    ((tag, body),) = obj.items()
    if tag == "b" and type(body) is str:
        return body.encode("latin-1")
    if type(body) is not list:
        raise WireError(f"tag {tag!r} without a list")
    if tag == "t":
        return tuple(body)
    if tag == "c" and len(body) == 2 and all(type(p) in (int, float) for p in body):
        return complex(body[0], body[1])
    if tag == "d":
        if not all(type(p) is list and len(p) == 2 for p in body):
            raise WireError("a dict entry that is not a key-value pair")
        _refuse_collisions([p[0] for p in body])
        return dict(body)  # TypeError for an unhashable key -> WireError above
    if tag in ("s", "z"):
        _refuse_collisions(body)
        return set(body) if tag == "s" else frozenset(body)
    raise WireError(f"unknown tag {tag!r}")


def _refuse_collisions(items: list) -> None:
    if len(items) < _COLLISION_CHECK_FROM:
        return
    try:
        fixed = [(hash(item), item) for item in items if isinstance(item, _FIXED_HASH)]
    except TypeError:
        raise WireError("an unhashable value inside a set, dict key or tuple") from None
    counts = Counter(h for h, _ in fixed)  # distinct hash values: no collisions in here
    crowded = {h for h, n in counts.items() if n > _MAX_SAME_HASH}
    if not crowded:
        return
    # Repeated hashes: equal values ([5] * 1000, fine) or distinct colliding ones (refused).
    buckets: dict[int, list] = {}
    for h, item in fixed:
        if h in crowded:
            same = buckets.setdefault(h, [])
            if not any(item == other for other in same):
                same.append(item)
                if len(same) > _MAX_SAME_HASH:
                    raise WireError("numbers with colliding hashes (quadratic to put in a set or dict)")


def _vet(value, depth: int) -> None:
    """Depth and hash collisions in the lists and tuples (sets and dicts are checked as built)."""
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if kind in (list, tuple):
        _refuse_collisions(value)  # the trusted side may well call set() on it
        for item in value:
            if type(item) in (list, tuple, dict, set, frozenset):
                _vet(item, depth + 1)
    elif kind is dict:
        for item in value.values():
            if type(item) in (list, tuple, dict, set, frozenset):
                _vet(item, depth + 1)
    elif kind in (set, frozenset):
        for item in value:
            if type(item) in (tuple, frozenset):
                _vet(item, depth + 1)
