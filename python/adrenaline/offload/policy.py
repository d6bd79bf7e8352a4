"""Which new decode requests are offloaded: decided once, at admission."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod


class OffloadPolicy(ABC):
    @abstractmethod
    def offload(self, num_local: int, num_offloaded: int) -> bool:
        """Whether the next admitted request runs its attention on an executor."""


class StaticRatioPolicy(OffloadPolicy):
    """Keep offloaded:local near ``ratio`` (N/M; ``inf``: offload all), at most ``max_offloaded``."""

    def __init__(self, ratio: float, max_offloaded: int | None = None) -> None:
        if ratio < 0:
            raise ValueError("--attention-offload-ratio must be >= 0")
        self.ratio = ratio
        self.max_offloaded = max_offloaded if max_offloaded is not None else math.inf

    def offload(self, num_local: int, num_offloaded: int) -> bool:
        if self.ratio == 0 or num_offloaded >= self.max_offloaded:
            return False
        if math.isinf(self.ratio):
            return True
        # offloading this one keeps N/M closest to the target without overshooting it
        return num_offloaded + 1 <= self.ratio * max(num_local, 1)
