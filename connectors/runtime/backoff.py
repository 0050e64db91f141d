"""Jittered exponential back-off ("full jitter"), pure and seedable."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delay before retry ``n`` is uniform in ``[0, min(cap, initial * factor**n)]``.

    Full jitter spreads reconnect storms of many pods; ``reset()`` after a
    connection has proved healthy so one blip does not keep the delay high.
    """

    initial_s: float = 0.5
    cap_s: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.initial_s * (self.factor**self.attempt))
        self.attempt += 1
        # Never zero: a tight reconnect loop would hammer the token endpoint.
        return max(self.initial_s / 10, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0
