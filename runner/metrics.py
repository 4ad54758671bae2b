"""Per-item measurements a stage process takes, and the aggregates it reports to the runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 95, 99)


@dataclass
class StageMetrics:
    """Per item: time waiting in the input queue, service time (stage call), bytes sent downstream."""

    waits_s: list[float] = field(default_factory=list)
    services_s: list[float] = field(default_factory=list)
    out_bytes: int = 0

    def record(self, wait_s: float, service_s: float, out_bytes: int) -> None:
        self.waits_s.append(wait_s)
        self.services_s.append(service_s)
        self.out_bytes += out_bytes

    def summary(self) -> dict:
        """Count, total bytes, and wait/service percentiles in milliseconds (msgpack-friendly)."""
        result: dict = {"items": len(self.services_s), "out_bytes": self.out_bytes}
        for key, values in (("wait_ms", self.waits_s), ("service_ms", self.services_s)):
            if values:
                points = np.percentile(np.asarray(values) * 1000, PERCENTILES)
                result[key] = {f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}
        return result
