"""A benchmark's overall time bound."""

from __future__ import annotations

import time


class BenchTimeout(RuntimeError):
    pass


class Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; raises BenchTimeout once none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise BenchTimeout("the benchmark's time bound ran out")
        return left
