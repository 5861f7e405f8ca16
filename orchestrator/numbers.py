"""One definition of "a usable metric value": a real number that is neither NaN nor infinite."""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
