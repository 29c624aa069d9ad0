"""Passes and partials as bytes for the resident engine: a small explicit codec, no pickle.

A pass travels as its class name, which must be registered here, and its attributes (`vars`): each
None, a bool, an int, a float, a short string, a float64 array (laid out in memory as pickle would
keep it), a list or tuple of those, or another registered object (the passes of a `ConcatPass`, the
`Mixture`s of an `EStepPass`, the `LatentClassModel`s of a `latent.MixedEStepPass`). The receiver
rebuilds the object from those values without calling its constructor, so a message can create
nothing but registered classes holding plain numbers, and the rebuilt pass is the sender's exactly.

Registering a pass is one line, `register(LloydPass, bound)`. `bound(pass_, partitions, rows)` is the
most float64 values the partials of `partitions` partitions holding `rows` rows in all can have: the
driver accepts no larger reply from a task (`reply_limit`).

Partials travel as int64 [count, partition ids, lengths] followed by the float64 values.
"""

from __future__ import annotations

import math
import struct
from typing import Callable

import numpy as np

from . import kernels, latent, marginal
from .latent_estep import Layout
from .mixture import ComponentStatistics, Mixture


class WireError(ValueError):
    """A message that does not decode (truncated, malformed, or naming an unregistered class)."""


_CLASSES: dict[str, type] = {}
_BOUNDS: dict[type, Callable[[object, int, int], int]] = {}
#: Nesting and string limits of a decoded message (passes nest two or three levels).
MAX_DEPTH = 16
MAX_STRING = 1 << 12


def register(cls: type, bound: Callable[[object, int, int], int] | None = None) -> type:
    """Allow `cls` on the wire; `bound` (for passes) bounds its partials (see the module docstring)."""
    _CLASSES[cls.__name__] = cls
    if bound is not None:
        _BOUNDS[cls] = bound
    return cls


def partial_bound(pass_, partitions: int, rows: int) -> int:
    """Most float64 values in the partials of `pass_` over `partitions` partitions of `rows` rows."""
    bound = _BOUNDS.get(type(pass_))
    if bound is None:
        raise WireError(f"{type(pass_).__name__} is not registered as a pass in spark_gmm.wire")
    return int(bound(pass_, partitions, rows))


def reply_limit(pass_, partitions: int, rows: int) -> int:
    """Most bytes of a task's reply to `pass_`: its partials and their int64 header."""
    return 8 * (1 + 2 * partitions + partial_bound(pass_, partitions, rows))


# Everything the passes hold or are, one line each.
register(Mixture)
register(kernels.EStepPass, lambda p, partitions, rows: partitions * (p.partial_bytes // 8))
register(
    kernels.HardAssignmentPass,
    lambda p, partitions, rows: partitions * ComponentStatistics.size(*p.centers.shape),
)
register(kernels.LloydPass, lambda p, partitions, rows: partitions * (1 + (p.centers.shape[0] + 2) * (p.centers.shape[1] + 1)))
register(kernels.CostPass, lambda p, partitions, rows: partitions)
register(kernels.ClosestWeightPass, lambda p, partitions, rows: partitions * len(p.centers))
register(kernels.SamplePass, lambda p, partitions, rows: rows * p.width)
register(kernels.SmallestUniformPass, lambda p, partitions, rows: min(partitions * p.count, rows) * p.width)
# The latent class model's passes (`latent`): one flat statistics vector per model (or seed) and
# partition, of the size its `partial_bytes` says.
register(latent.LatentClassModel)
register(latent.Columns)
register(Layout)
register(latent.MixedEStepPass, lambda p, partitions, rows: partitions * (p.partial_bytes // 8))
register(latent.MixedStartPass, lambda p, partitions, rows: partitions * (p.partial_bytes // 8))
register(marginal.CompleteRowsPass, lambda p, partitions, rows: partial_bound(p.inner, partitions, rows))
register(
    kernels.ConcatPass,
    lambda p, partitions, rows: partitions * len(p.passes)
    + sum(partial_bound(q, partitions, rows) for q in p.passes),
)


# -- passes -----------------------------------------------------------------------------------------


def encode_pass(pass_) -> bytes:
    out: list[bytes] = []
    _encode(pass_, out, "pass")
    return b"".join(out)


def _encode(value, out: list[bytes], where: str) -> None:
    if value is None:
        out.append(b"N")
    elif isinstance(value, (bool, np.bool_)):
        out.append(b"B" + (b"\x01" if value else b"\x00"))
    elif isinstance(value, (int, np.integer)):
        out.append(b"I" + struct.pack("<q", int(value)))
    elif isinstance(value, (float, np.floating)) and np.asarray(value).dtype == np.float64:
        out.append(b"D" + struct.pack("<d", float(value)))
    elif isinstance(value, str):
        out.append(b"S" + _text(value))
    elif isinstance(value, np.ndarray) and value.dtype == np.float64:
        # The memory layout travels too, as pickle keeps it (the axes in the order that makes the
        # array contiguous): the kernels' rounding can depend on it, and the driver engine's tasks
        # receive pickled passes.
        axes = tuple(int(a) for a in np.argsort([-s for s in value.strides], kind="stable"))
        laid = value.transpose(axes)
        if not laid.flags.c_contiguous:
            axes, laid = tuple(range(value.ndim)), np.ascontiguousarray(value)
        out.append(b"A" + struct.pack(f"<B{value.ndim}B{value.ndim}q", value.ndim, *axes, *laid.shape))
        out.append(laid.astype("<f8", copy=False).tobytes())
    elif isinstance(value, (list, tuple)):
        out.append((b"L" if isinstance(value, list) else b"U") + struct.pack("<I", len(value)))
        for i, item in enumerate(value):
            _encode(item, out, f"{where}[{i}]")
    elif _CLASSES.get(type(value).__name__) is type(value):
        attributes = vars(value)
        out.append(b"O" + _text(type(value).__name__) + struct.pack("<I", len(attributes)))
        for name, item in attributes.items():
            out.append(_text(name))
            _encode(item, out, f"{where}.{name}")
    else:
        kind = f"{value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
        raise WireError(
            f"cannot send {where} ({kind}) to the resident tasks: passes hold only numbers, strings, "
            "float64 arrays, lists and objects registered in spark_gmm.wire"
        )


def _text(value: str) -> bytes:
    data = value.encode()
    if len(data) > MAX_STRING:
        raise WireError(f"string of {len(data)} bytes is longer than {MAX_STRING}")
    return struct.pack("<H", len(data)) + data


class _Reader:
    def __init__(self, data: bytes):
        self.view, self.at = memoryview(data), 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.view):
            raise WireError("message truncated")
        chunk = self.view[self.at : self.at + n]
        self.at += n
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def text(self) -> str:
        (n,) = self.unpack("<H")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise WireError("string is not UTF-8") from None


def decode_pass(data: bytes):
    reader = _Reader(data)
    value = _decode(reader, 0)
    if reader.at != len(reader.view):
        raise WireError(f"{len(reader.view) - reader.at} bytes after the pass")
    return value


def _decode(reader: _Reader, depth: int):
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    tag = bytes(reader.take(1))
    if tag == b"N":
        return None
    if tag == b"B":
        return reader.take(1) != b"\x00"
    if tag == b"I":
        return reader.unpack("<q")[0]
    if tag == b"D":
        return reader.unpack("<d")[0]
    if tag == b"S":
        return reader.text()
    if tag == b"A":
        (ndim,) = reader.unpack("<B")
        axes = reader.unpack(f"<{ndim}B")
        shape = reader.unpack(f"<{ndim}q")
        if sorted(axes) != list(range(ndim)) or min(shape, default=0) < 0:
            raise WireError("malformed array header")
        laid = np.frombuffer(reader.take(8 * math.prod(shape)), dtype="<f8").reshape(shape)
        return laid.astype(np.float64).transpose(np.argsort(axes))  # an aligned copy, laid out as sent
    if tag in (b"L", b"U"):
        (count,) = reader.unpack("<I")
        if count > len(reader.view) - reader.at:  # every item takes at least one byte
            raise WireError("list longer than its message")
        items = [_decode(reader, depth + 1) for _ in range(count)]
        return items if tag == b"L" else tuple(items)
    if tag == b"O":
        name = reader.text()
        cls = _CLASSES.get(name)
        if cls is None:
            raise WireError(f"class {name!r} is not registered in spark_gmm.wire")
        (count,) = reader.unpack("<I")
        attributes = {}
        for _ in range(count):
            key = reader.text()
            if not key.isidentifier():
                raise WireError(f"attribute name {key!r} of {name}")
            attributes[key] = _decode(reader, depth + 1)
        obj = cls.__new__(cls)
        obj.__dict__.update(attributes)
        return obj
    raise WireError(f"unknown tag {tag!r}")


# -- partials ---------------------------------------------------------------------------------------


def encode_partials(parts: list[tuple[int, np.ndarray]]) -> bytes:
    header = np.array([len(parts)] + [p for p, _ in parts] + [len(a) for _, a in parts], dtype="<i8")
    return b"".join([header.tobytes()] + [np.asarray(a, dtype="<f8").tobytes() for _, a in parts])


def decode_partials(data, partitions: int) -> list[tuple[int, np.ndarray]]:
    """(partition, partial) pairs of a task's reply, checked against the fit's `partitions`."""
    if len(data) < 8 or len(data) % 8:
        raise WireError(f"a reply of {len(data)} bytes is not a list of partials")
    words = np.frombuffer(data, dtype="<i8")
    count = int(words[0])
    if not 0 <= count <= partitions or len(words) < 1 + 2 * count:
        raise WireError(f"a reply claims {count} partials of {partitions} partitions")
    pids, lengths = words[1 : 1 + count], words[1 + count : 1 + 2 * count]
    if ((pids < 0) | (pids >= partitions)).any() or len(set(pids.tolist())) != count or (lengths < 0).any():
        raise WireError("a reply names unknown or repeated partitions")
    if 1 + 2 * count + int(lengths.sum()) != len(words):
        raise WireError("a reply's partial lengths do not add up to its size")
    values = np.frombuffer(data, dtype="<f8", offset=8 * (1 + 2 * count))
    cuts = np.cumsum(lengths)[:-1]
    return [(int(p), part.copy()) for p, part in zip(pids, np.split(values, cuts))] if count else []
