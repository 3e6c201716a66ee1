"""How the benchmarks time things and sum them up: one home for the clock, the median and the spread.

A figure is a median over repeated runs (robust to the odd run that a shared machine slows down), printed with its
range and its count, so that a reader sees how noisy it was.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Spread:
    """The median of some figures, their lowest and highest, and how many there were."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Spread":
        values = list(values)
        if not values:
            raise ValueError("no figures to summarize: at least one run is needed")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
        """'12.3 ms (median of 8; 11.9-14.0)' for unit 'ms' and scale 1000 (seconds to milliseconds)."""
        f = lambda v: f"{v * scale:.{digits}f}"  # noqa: E731
        return f"{f(self.median)}{' ' + unit if unit else ''} (median of {self.count}; {f(self.low)}-{f(self.high)})"


def timed(call: Callable[[], T]) -> tuple[T, float]:
    """call()'s result and the seconds it took (wall clock: what a user waits)."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start

