"""Per-item measurements a stage process takes, the aggregates it reports, and the run's outputs: the per-stage
table, the figures as JSON, and the Chrome trace."""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, field

PERCENTILES = (50, 95, 99)
TIMES = ("wait", "service", "send", "device")  # the durations a stage keeps histograms of: per message, per step
WIRE_ONLY = ("histograms", "batch_counts")  # what a stage reports for the endpoint, not for the JSON figures
# Log-spaced histogram buckets: a percentile read as its bucket's geometric middle is within 1.2 % (half a
# bucket) of the exact one, in fixed memory however long the run.
BUCKETS_PER_DECADE = 100
SMALLEST_S = 1e-6  # durations at or below this fall in bucket 0, read as 0
MS = 1000.0
US = 1e6
TRACE_PID = 1
ROUND_US, ROUND_MS = 3, 6  # trace times to the nanosecond: shorter files, no lost precision
E2E_COUNTER = "end-to-end latency ms"  # a counter track in the trace: each delta's latency as it arrives


def bucket_of(seconds: float) -> int:
    """The histogram bucket holding a duration: bucket k > 0 covers (upper_bound(k - 1), upper_bound(k)]."""
    if seconds <= SMALLEST_S:
        return 0
    return math.ceil(math.log10(seconds / SMALLEST_S) * BUCKETS_PER_DECADE - 1e-9)


def upper_bound(index: float) -> float:
    """Upper edge of bucket `index` in seconds (a fractional index gives a point inside the bucket)."""
    return SMALLEST_S * 10 ** (index / BUCKETS_PER_DECADE)


class LogHistogram:
    """Durations counted in log-spaced buckets: percentiles and cumulative counts in fixed memory."""

    def __init__(self, counts: dict[int, int] | None = None, total: float = 0.0, maximum: float = 0.0):
        self.counts = counts if counts is not None else {}
        self.count = sum(self.counts.values())
        self.total = total
        self.maximum = maximum

    def add(self, seconds: float) -> None:
        index = bucket_of(seconds)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total += seconds
        self.maximum = max(self.maximum, seconds)

    def percentile(self, p: float) -> float:
        """The p-th percentile (nearest rank) in seconds, read as its bucket's middle and capped at the maximum."""
        if not self.count:
            raise ValueError("percentile of an empty histogram")
        rank = max(1, math.ceil(p * self.count / 100 - 1e-9))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return 0.0 if index == 0 else min(self.maximum, upper_bound(index - 0.5))
        raise AssertionError("ranks beyond the count")  # unreachable: the counts sum to self.count

    def count_at_most(self, bound: float) -> int:
        """How many durations are at most `bound`; exact when `bound` is a bucket edge (see upper_bound)."""
        last = bucket_of(bound)
        return sum(count for index, count in self.counts.items() if index <= last)

    def to_wire(self) -> list:
        """A msgpack-friendly form (msgpack maps from a stage need string keys, so the buckets are pairs)."""
        return [self.total, self.maximum, sorted(self.counts.items())]

    @classmethod
    def from_wire(cls, data: list) -> LogHistogram:
        total, maximum, pairs = data
        return cls({int(index): int(count) for index, count in pairs}, total, maximum)

    def copy(self) -> LogHistogram:
        return LogHistogram(dict(self.counts), self.total, self.maximum)

    def merge(self, other: LogHistogram | None) -> None:
        """Count another histogram's durations too."""
        if other is None:
            return
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.count += other.count
        self.total += other.total
        self.maximum = max(self.maximum, other.maximum)


def percentiles_ms(histogram: LogHistogram) -> dict[str, float]:
    return {f"p{p}": histogram.percentile(p) * MS for p in PERCENTILES}


@dataclass
class StepRecord:
    """One stage call, a step over the messages waiting (or one chunk the capture read): when it began (wall
    clock), how long its parts took, the rows of each batched computation in it, and the messages it took."""

    start: float
    service_s: float  # the stage call (its throttle included)
    send_s: float = 0.0  # putting the outputs on the output queue, blocked time included (backpressure)
    out_bytes: int = 0
    device_s: float | None = None  # GPU time of the stage call (CUDA events), None on CPU or until known
    batch_sizes: list[int] = field(default_factory=list)  # rows of each batched computation (none: no stage call)
    # Per message taken: [stream id, wait s in the input queue from the sender's send to the step's start (None: no
    # input queue), capture time of the audio it covers (follows a frame from capture to text), whether it is
    # its stream's end or failure rather than an 80 ms frame].
    items: list[list] = field(default_factory=list)

    def as_list(self) -> list:
        """The fields in order (the form the trace reads), msgpack-friendly."""
        return list(astuple(self))


def batch_summary(rows: dict[int, int]) -> dict[str, float]:
    """Batched computations by their rows ({rows: how many}) as count, mean, p95 (nearest rank) and max rows."""
    count = sum(rows.values())
    rank, seen, p95 = math.ceil(0.95 * count - 1e-9), 0, 0
    for size in sorted(rows):
        seen += rows[size]
        if seen >= rank:
            p95 = size
            break
    return {"count": count, "mean": sum(size * n for size, n in rows.items()) / count, "p95": p95, "max": max(rows)}


class StageMetrics:
    """Everything one stage process measured: counters and histograms for the table and the live figures (waits
    per message, the other times per step), the batch sizes, and, when profiling, every step's record."""

    def __init__(self, keep_records: bool = False):
        self.keep_records = keep_records
        self.items = 0  # messages taken
        self.ends = 0  # of them, streams' ends and failures
        self.steps = 0
        self.out_bytes = 0
        self.busy_s = 0.0
        self.histograms = {name: LogHistogram() for name in TIMES}
        self.rows: dict[int, int] = {}  # batched computations by their rows: {rows: how many}
        self.records: list[StepRecord] = []

    def record(self, step: StepRecord) -> None:
        self.steps += 1
        self.items += len(step.items)
        self.ends += sum(1 for *_, ended in step.items if ended)
        self.out_bytes += step.out_bytes
        self.busy_s += step.service_s
        for _, wait_s, _, _ in step.items:
            if wait_s is not None:
                self.histograms["wait"].add(wait_s)
        self.histograms["service"].add(step.service_s)
        self.histograms["send"].add(step.send_s)
        for rows in step.batch_sizes:
            self.rows[rows] = self.rows.get(rows, 0) + 1
        if self.keep_records:
            self.records.append(step)

    def add_device_time(self, step: StepRecord, seconds: float) -> None:
        """The GPU time of a step's stage call, known once the device has passed the call's end."""
        step.device_s = seconds
        self.histograms["device"].add(seconds)

    def snapshot(self) -> dict:
        """The figures a stage reports (msgpack-friendly): counts, busy time, percentiles in ms, batch sizes,
        histograms."""
        result: dict = {"items": self.items, "ends": self.ends, "steps": self.steps, "out_bytes": self.out_bytes}
        result["busy_s"] = self.busy_s
        for name, histogram in self.histograms.items():
            if histogram.count:
                result[f"{name}_ms"] = percentiles_ms(histogram)
        if self.rows:
            result["batch"] = batch_summary(self.rows)
        result["histograms"] = {name: histogram.to_wire() for name, histogram in self.histograms.items()}
        result["batch_counts"] = sorted(self.rows.items())  # pairs: msgpack maps from a stage need string keys
        return result


def estimate_clock_offset(samples: list[tuple[float, float, float]]) -> float:
    """A peer's wall clock minus ours, NTP-style, from (we sent, it replied, we received) round trips: the reply
    is taken to have been made halfway through the shortest round trip. An offset within half that round trip
    cannot be told from none (a peer on our own clock always measures so), so it counts as 0."""
    sent, replied, received = min(samples, key=lambda sample: sample[2] - sample[0])
    offset = replied - (sent + received) / 2
    return offset if abs(offset) > (received - sent) / 2 else 0.0


@dataclass
class RunFigures:
    """What the runner knows of a run at one moment: each local stage's last report (its metrics snapshot and
    output queue), the end-to-end latencies seen at the sink, and the stream's wall time."""

    stages: dict[str, dict]
    wall_s: float
    e2e: LogHistogram | None = None  # None where this host runs no sink
    delay_ms: int | None = None
    clock_offsets: dict[str, float] = field(default_factory=dict)  # stage wall clock minus the runner's, s

    def utilisation(self, name: str) -> float:
        """Busy time over the stream's wall time."""
        return self.stages[name].get("metrics", {}).get("busy_s", 0.0) / max(self.wall_s, 1e-9)

    def bottleneck(self) -> str | None:
        """The busiest stage: the one whose service time limits the rate (None before any item)."""
        busy = {
            name: self.utilisation(name) for name in self.stages if self.stages[name].get("metrics", {}).get("items")
        }
        return max(busy, key=busy.__getitem__) if busy else None

    def to_json(self) -> dict:
        """Per stage and end to end, for --stats-json (times in ms)."""
        stages = {}
        for name, report in self.stages.items():
            metrics = report.get("metrics", {})
            entry = {key: value for key, value in metrics.items() if key not in WIRE_ONLY}
            entry["utilisation"] = self.utilisation(name)
            entry["clock_offset_ms"] = self.clock_offsets.get(name, 0.0) * MS
            if "edge" in report:
                entry["queue"] = {key: report[key] for key in QUEUE_KEYS if key in report}
            for key in ("streams", "settings", "kv", "graphs"):
                if key in report:
                    entry[key] = report[key]
            for key in CAPTURE_KEYS:
                if key in report:
                    entry[key] = report[key]
            stages[name] = entry
        result: dict = {"wall_s": self.wall_s, "delay_ms": self.delay_ms, "bottleneck": self.bottleneck()}
        result["stages"] = stages
        if self.e2e is not None:
            result["end_to_end_ms"] = {"count": self.e2e.count} | (percentiles_ms(self.e2e) if self.e2e.count else {})
        return result


# What the capture reports about its source: input overflows, and how far a live source fell behind real time.
CAPTURE_KEYS = ("overflows", "max_lag_s", "late_chunks")
# What a stage reports about its output queue.
QUEUE_KEYS = ("edge", "policy", "capacity", "sent", "dropped", "depth", "peak_depth")


def format_table(figures: RunFigures) -> str:
    """The per-stage table (times in ms), the end-to-end latency and the bottleneck, as printed after a run."""

    def percentile(metrics: dict, key: str, p: int) -> str:
        return f"{metrics[key][f'p{p}']:.2f}" if key in metrics else "-"

    def batch(metrics: dict) -> str:
        summary = metrics.get("batch")
        return f"{summary['mean']:.1f}/{summary['p95']}/{summary['max']}" if summary else "-"

    columns = [("stage", 11), ("items", 6), ("busy s", 7), ("util", 5)]
    columns += [(f"svc p{p}", 8) for p in PERCENTILES] + [(f"wait p{p}", 9) for p in PERCENTILES]
    columns += [("dev p50", 8), ("send p99", 9), ("queue", 7), ("drops", 6), ("steps", 6), ("batch", 14)]
    lines = [
        f"per-stage figures over the {figures.wall_s:.2f} s stream (times in ms)",
        " ".join(
            f"{title:<{width}}" if index == 0 else f"{title:>{width}}" for index, (title, width) in enumerate(columns)
        ),
    ]
    for name, report in figures.stages.items():
        metrics = report.get("metrics", {})
        cells = [name, str(metrics.get("items", 0)), f"{metrics.get('busy_s', 0.0):.2f}"]
        cells.append(f"{figures.utilisation(name):.0%}")
        cells += [percentile(metrics, "service_ms", p) for p in PERCENTILES]
        cells += [percentile(metrics, "wait_ms", p) for p in PERCENTILES]
        cells += [percentile(metrics, "device_ms", 50), percentile(metrics, "send_ms", 99)]
        cells.append(f"{report['peak_depth']}/{report['capacity']}" if "capacity" in report else "-")
        cells += [str(report.get("dropped", 0)), str(metrics.get("steps", 0)), batch(metrics)]
        lines.append(
            " ".join(
                f"{cell:<{width}}" if index == 0 else f"{cell:>{width}}"
                for index, (cell, (_, width)) in enumerate(zip(cells, columns, strict=True))
            )
        )
    lines.append(
        "items: messages taken (80 ms frames, then each stream's end); util: busy / wall time; svc, dev, send: per "
        "step, wait: per message; queue: peak/capacity of the stage's output queue; steps: stage calls, each over "
        "the messages waiting; batch: rows per batched computation, mean/p95/max"
    )
    captures = [
        f"{name} {report['graphs']['captured']} in {report['graphs']['capture_s']:.2f} s"
        for name, report in figures.stages.items()
        if report.get("graphs", {}).get("captured")
    ]
    if captures:
        lines.append(
            "CUDA graphs captured after the warm-up (a step meeting a new shape waits for its capture): "
            + ", ".join(captures)
        )
    if figures.e2e is not None:
        delay = f"{figures.delay_ms} ms" if figures.delay_ms is not None else "model's"
        if figures.e2e.count:
            points = ", ".join(f"{key} {value:.2f}" for key, value in percentiles_ms(figures.e2e).items())
            lines.append(
                f"end-to-end latency, audio captured to its text here, beyond the {delay} delay: {points} ms "
                f"({figures.e2e.count} deltas)"
            )
        else:
            lines.append("end-to-end latency: no text arrived")
    bottleneck = figures.bottleneck()
    if bottleneck is not None:
        lines.append(f"bottleneck: {bottleneck} (busy {figures.utilisation(bottleneck):.0%} of the stream)")
    return "\n".join(lines)


def chrome_trace(
    tracks: dict[str, list[list]],
    *,
    origin: float,
    clock_offsets: dict[str, float] | None = None,
    sink: list[list[float]] | None = None,
    metadata: dict | None = None,
) -> dict:
    """A Chrome trace (Perfetto, chrome://tracing) of stage records (StepRecord.as_list, by stage in pipeline
    order): one track per stage, a slice per step (its messages, batch sizes, device time and waits in its args)
    and one while its send was blocked, a flow per frame (its stream and capture time) from stage to stage, and
    the sink's arrivals ([arrival, capture_time]) as a latency counter.

    Times are in µs from `origin` (the runner's wall clock); each stage's are first moved onto the runner's clock
    by its offset (stage clock minus runner clock), so stages on other hosts line up."""
    offsets = clock_offsets or {}
    events: list[dict] = [{"ph": "M", "name": "process_name", "pid": TRACE_PID, "args": {"name": "voxtral-run"}}]
    frames: dict[tuple[str, float], list[tuple[int, float]]] = {}  # (stream, capture time) -> (track, ts) per span
    for track, (name, records) in enumerate(tracks.items(), start=1):
        events.append({"ph": "M", "name": "thread_name", "pid": TRACE_PID, "tid": track, "args": {"name": name}})
        sort = {"sort_index": track}
        events.append({"ph": "M", "name": "thread_sort_index", "pid": TRACE_PID, "tid": track, "args": sort})
        shift = origin + offsets.get(name, 0.0)
        for start, service_s, send_s, out_bytes, device_s, batch_sizes, items in records:
            ts = round((start - shift) * US, ROUND_US)
            args: dict = {"items": len(items), "batch_sizes": batch_sizes, "out_bytes": out_bytes}
            waits = [round(wait_s * MS, ROUND_MS) for _, wait_s, _, _ in items if wait_s is not None]
            if waits:
                args["waits_ms"] = waits
            if device_s is not None:
                args["device_ms"] = round(device_s * MS, ROUND_MS)
            ends = sum(1 for *_, ended in items if ended)
            if ends:
                args["stream_ends"] = ends
            dur = round(service_s * US, ROUND_US)
            events.append({"ph": "X", "name": name, "pid": TRACE_PID, "tid": track, "ts": ts, "dur": dur, "args": args})
            if send_s > 0:
                blocked = {"ph": "X", "name": "send", "pid": TRACE_PID, "tid": track, "ts": round(ts + dur, ROUND_US)}
                events.append(blocked | {"dur": round(send_s * US, ROUND_US)})
            for frame in {(stream, capture_time) for stream, _, capture_time, ended in items if not ended}:
                frames.setdefault(frame, []).append((track, ts))
    for arrival, capture_time in sink or []:
        latency = {"latency_ms": round((arrival - capture_time) * MS, ROUND_MS)}
        ts = round((arrival - origin) * US, ROUND_US)
        events.append({"ph": "C", "name": E2E_COUNTER, "pid": TRACE_PID, "ts": ts, "args": latency})
    # A flow starts at a frame's first span and steps through the rest (Perfetto draws each step's arrow).
    chains = [sorted(spans) for spans in frames.values() if len(spans) > 1]  # pipeline order, then time
    for flow_id, spans in enumerate(chains, start=1):
        for step, (span_track, ts) in enumerate(spans):
            phase = "s" if step == 0 else "t"
            flow = {"ph": phase, "name": "frame", "cat": "frame", "id": flow_id, "pid": TRACE_PID, "tid": span_track}
            events.append(flow | {"ts": ts, "bp": "e"})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"origin": origin} | (metadata or {})}
