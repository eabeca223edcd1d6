"""Declared parameter types of every kernel entry point.

CuPy passes kernel arguments without checking them against the C signature
(a float64 array given to a ``float*`` parameter, or a Python int given to an
``int`` parameter, which CuPy sends as 64 bits, silently corrupts the launch).
:func:`gpudiffim._cuda.launch.launch` checks every call against this table,
and the emulator generates its launch shims from it.  Keys are the CuPy
``name_expressions`` (``"gdi_residual_moments<double>"``).
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["KernelSpec", "KERNELS", "SCALAR_TYPES", "POINTER_TYPES"]

#: C scalar type -> NumPy dtype.
SCALAR_TYPES = {"int": np.dtype(np.int32), "float": np.dtype(np.float32), "double": np.dtype(np.float64)}
#: C pointee type -> NumPy dtype.
POINTER_TYPES = {"int": np.dtype(np.int32), "float": np.dtype(np.float32), "double": np.dtype(np.float64)}


@dataclass(frozen=True)
class KernelSpec:
    """One entry point: the unit (``.cu`` file) and ``(name, C type)`` parameters.

    C types are ``"int"``, ``"float"``, ``"double"`` or pointers to them,
    ``"const T*"`` (read) or ``"T*"`` (written).
    """

    unit: str
    params: tuple

    def __post_init__(self):
        for _, ctype in self.params:
            parse_ctype(ctype)


def parse_ctype(ctype):
    """``(kind, pointee or scalar dtype, const)`` of a declared C type."""
    text = ctype.strip()
    if text.endswith("*"):
        base = text[:-1].strip()
        const = base.startswith("const ")
        base = base.removeprefix("const ").strip()
        if base not in POINTER_TYPES:
            raise ValueError(f"unsupported pointer type {ctype!r}")
        return "pointer", POINTER_TYPES[base], const
    if text not in SCALAR_TYPES:
        raise ValueError(f"unsupported scalar type {ctype!r}")
    return "scalar", SCALAR_TYPES[text], True


def _residual_moments(t):
    return KernelSpec("residual_moments", (
        ("diff", f"const {t}*"), ("var", f"const {t}*"), ("mask", "const int*"), ("bad_bits", "int"),
        ("n_stamps", "int"), ("ny", "int"), ("nx", "int"),
        ("row0", "int"), ("row1", "int"), ("col0", "int"), ("col1", "int"),
        ("out", "double*"),
    ))


KERNELS = {f"gdi_residual_moments<{t}>": _residual_moments(t) for t in ("float", "double")}
