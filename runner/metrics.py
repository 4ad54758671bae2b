"""Per-item measurements a stage process takes, the aggregates it reports, and the run's profile outputs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PERCENTILES = (50, 95, 99)


@dataclass
class ItemRecord:
    """One item through a stage: when its service began (wall clock), and how long each part took."""

    start: float
    wait_s: float  # in the input queue: from the sender's send to the start of service
    service_s: float  # the stage call (push or finish)
    send_s: float  # putting the outputs on the output queue, blocked time included (backpressure)
    out_bytes: int
    capture_time: float  # of the audio the item covers: follows a frame from capture to text
    device_s: float | None = None  # GPU time of the stage call (CUDA events), None on CPU

    def as_list(self) -> list:
        return [self.start, self.wait_s, self.service_s, self.send_s, self.out_bytes, self.capture_time, self.device_s]


@dataclass
class StageMetrics:
    """All items of one stage process; summarised for the end-of-run table, listed for the trace."""

    records: list[ItemRecord] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def record(self, item: ItemRecord) -> None:
        self.records.append(item)

    def summary(self) -> dict:
        """Count, bytes, utilisation, and wait/service/send/device percentiles in ms (msgpack-friendly)."""
        elapsed = max(time.time() - self.started, 1e-9)
        busy = sum(record.service_s for record in self.records)
        result: dict = {
            "items": len(self.records),
            "out_bytes": sum(record.out_bytes for record in self.records),
            "utilisation": busy / elapsed,
        }
        columns = {
            "wait_ms": [record.wait_s for record in self.records],
            "service_ms": [record.service_s for record in self.records],
            "send_ms": [record.send_s for record in self.records],
            "device_ms": [record.device_s for record in self.records if record.device_s is not None],
        }
        for key, values in columns.items():
            if values:
                points = np.percentile(np.asarray(values) * 1000, PERCENTILES)
                result[key] = {f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}
        return result


def format_table(stats: dict[str, dict]) -> str:
    """The end-of-run per-stage table (times in ms) from each stage's last report."""

    def percentile(summary: dict, key: str, p: int) -> str:
        return f"{summary[key][f'p{p}']:.2f}" if key in summary else "-"

    header = (
        f"{'stage':<11} {'items':>6} {'wait p50':>9} {'wait p99':>9} {'svc p50':>8} {'svc p95':>8} {'svc p99':>8} "
        f"{'dev p50':>8} {'send p99':>9} {'util':>5} {'depth':>5} {'drops':>5}"
    )
    lines = [header]
    for name, report in stats.items():
        summary = report.get("metrics", {})
        lines.append(
            f"{name:<11} {summary.get('items', 0):>6} {percentile(summary, 'wait_ms', 50):>9} "
            f"{percentile(summary, 'wait_ms', 99):>9} {percentile(summary, 'service_ms', 50):>8} "
            f"{percentile(summary, 'service_ms', 95):>8} {percentile(summary, 'service_ms', 99):>8} "
            f"{percentile(summary, 'device_ms', 50):>8} {percentile(summary, 'send_ms', 99):>9} "
            f"{summary.get('utilisation', 0.0):>5.0%} {report.get('peak_depth', 0):>5} {report.get('dropped', 0):>5}"
        )
    return "\n".join(lines)


def write_chrome_trace(path: Path, records: dict[str, list[list]]) -> None:
    """A Chrome trace (Perfetto, chrome://tracing): one track per stage, a slice per item (plus one while it
    waited on a full queue), and flow arrows following each frame by its capture time from stage to stage."""
    events: list[dict] = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "voxtral-run"}}]
    first_seen: dict[float, int] = {}  # capture time -> flow id
    for track, (name, items) in enumerate(records.items(), start=1):
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": track, "args": {"name": name}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": track, "args": {"sort_index": track}})
        for start, wait_s, service_s, send_s, out_bytes, capture_time, device_s in items:
            begin_us = start * 1e6
            args = {"wait_ms": wait_s * 1e3, "out_bytes": out_bytes, "capture_time": capture_time}
            if device_s is not None:
                args["device_ms"] = device_s * 1e3
            slice_event = {"ph": "X", "name": name, "pid": 1, "tid": track, "ts": begin_us, "dur": service_s * 1e6}
            events.append(slice_event | {"args": args})
            if send_s > 0:
                blocked = {"ph": "X", "name": "send", "pid": 1, "tid": track, "ts": begin_us + service_s * 1e6}
                events.append(blocked | {"dur": send_s * 1e6})
            flow_id = first_seen.setdefault(capture_time, len(first_seen) + 1)
            phase = "s" if track == 1 else "t"
            events.append(
                {"ph": phase, "name": "frame", "cat": "frame", "id": flow_id, "pid": 1, "tid": track, "ts": begin_us}
            )
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
