"""Tensor dtypes a packet may carry, as safetensors spells them, and the finite-value check for floats."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DTYPES", "DType", "dtype_code", "has_nonfinite"]


def _bfloat16() -> np.dtype[Any]:
    # ml_dtypes takes about half a second to import; only a packet with a BF16 tensor needs it, so it
    # is loaded when such a tensor is read or written, not when the format (or the CLI) is imported.
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class DType:
    code: str
    _numpy: np.dtype[Any] | None
    # For float types: the exponent mask, read through an unsigned view; all exponent bits set
    # means Inf or NaN. None for integer and bool types.
    exponent_mask: int | None = None
    size: int = 0

    @property
    def numpy(self) -> np.dtype[Any]:
        return self._numpy if self._numpy is not None else _bfloat16()

    @property
    def itemsize(self) -> int:
        return self.size or self.numpy.itemsize


DTYPES: dict[str, DType] = {
    d.code: d
    for d in (
        DType("F64", np.dtype("<f8"), 0x7FF0000000000000),
        DType("F32", np.dtype("<f4"), 0x7F800000),
        DType("F16", np.dtype("<f2"), 0x7C00),
        DType("BF16", None, 0x7F80, size=2),
        DType("I64", np.dtype("<i8")),
        DType("I32", np.dtype("<i4")),
        DType("I16", np.dtype("<i2")),
        DType("I8", np.dtype("i1")),
        DType("U8", np.dtype("u1")),
        DType("BOOL", np.dtype("?")),
    )
}
_CODE_OF_NUMPY = {d.numpy: d.code for d in DTYPES.values() if d._numpy is not None}


def dtype_code(array: np.ndarray) -> str:
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _CODE_OF_NUMPY.get(dt)
    if code is None and "ml_dtypes" in sys.modules and dt == _bfloat16():  # a bfloat16 array implies ml_dtypes
        code = "BF16"
    if code is None:
        raise TypeError(f"dtype {array.dtype} cannot go into a packet; use one of {sorted(DTYPES)}")
    return code


def has_nonfinite(buf: memoryview, dtype: DType) -> bool:
    """True when the little-endian elements in ``buf`` include an Inf or NaN."""
    if dtype.code in ("F32", "F64"):
        return not bool(np.isfinite(np.frombuffer(buf, dtype.numpy)).all())
    bits = np.frombuffer(buf, np.dtype(f"<u{dtype.itemsize}"))
    mask = np.array(dtype.exponent_mask, bits.dtype)
    return bool(((bits & mask) == mask).any())
