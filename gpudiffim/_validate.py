"""Value checks shared by the configuration and the basis builders.

Each check raises :class:`~gpudiffim.errors.ConfigurationError` naming the
argument, what was expected and what was received, and returns the value
normalised to a Python scalar.
"""

import math

import numpy as np

from .errors import ConfigurationError


def fail(name, value, expected):
    """Raise ``ConfigurationError`` for ``name=value``."""
    msg = f"invalid {name}={value!r}: expected {expected}"
    raise ConfigurationError(msg)


def is_int(value):
    """True for Python or NumPy integers, not booleans."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name, value, minimum=None, maximum=None, odd=False):
    """An integer within ``[minimum, maximum]`` (and odd if asked)."""
    if not is_int(value):
        fail(name, value, "an integer")
    if minimum is not None and value < minimum:
        fail(name, value, f"an integer >= {minimum}")
    if maximum is not None and value > maximum:
        fail(name, value, f"an integer <= {maximum}")
    if odd and value % 2 == 0:
        fail(name, value, "an odd integer")
    return int(value)


def check_real(name, value, minimum=None, positive=False):
    """A finite real number, ``> 0`` if ``positive``, ``>= minimum`` if given."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        fail(name, value, "a real number")
    value = float(value)
    if not math.isfinite(value):
        fail(name, value, "a finite number")
    if positive and value <= 0:
        fail(name, value, "a number > 0")
    if minimum is not None and value < minimum:
        fail(name, value, f"a number >= {minimum}")
    return value
