"""Bounds the params schema checks, in plain Python: the schema (`pipeline.config`) validates
against them without importing torch or the maths that obeys them."""

from __future__ import annotations

import math


def max_spindle_lambda(num_timesteps: int) -> float:
    """Largest lambda * max|h| that keeps the discrete spindle alpha monotone (PAPER §3).

    alpha_{t-1} - alpha_t = 1/T + lambda h (sin(pi t/T) - sin(pi (t-1)/T)) and the sine
    increment is at most sin(pi/T) in size, so lambda |h| <= 1 / (T sin(pi / T)).
    """
    if num_timesteps <= 1:
        return math.inf
    return 1.0 / (num_timesteps * math.sin(math.pi / num_timesteps))
