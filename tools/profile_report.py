"""Draw a voxtral-run trace (`voxtral-run ... --profile trace.json`) as a PNG, for people who would rather look
than read: each stage's timeline (busy and blocked on a full queue), then the distributions of service time,
queue wait and end-to-end latency.

Run from the repository root: `python -m tools.profile_report trace.json [-o report.png]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from voxtral_run.runner.metrics import E2E_COUNTER, MS, SMALLEST_S, US  # noqa: E402

BLOCKED_SLICE = "send"  # the runner's name for time blocked on a full output queue
FIGURE_WIDTH_IN = 12
TRACK_HEIGHT_IN = 0.45
PANEL_HEIGHT_IN = 3.0
DPI = 120
SHORTEST_MS = SMALLEST_S * MS  # shorter times are drawn at this floor of the log scale


@dataclass
class StageTrack:
    """One stage's slices (steps) from the trace: (start, duration) in seconds from the stream's start, and the
    waits of the messages each step took."""

    busy: list[tuple[float, float]] = field(default_factory=list)
    blocked: list[tuple[float, float]] = field(default_factory=list)
    service_ms: list[float] = field(default_factory=list)
    wait_ms: list[float] = field(default_factory=list)


@dataclass
class Profile:
    """What the report draws: the stages in pipeline order and the end-to-end latencies (arrival s, ms)."""

    stages: dict[str, StageTrack]
    latencies: list[tuple[float, float]]


class ReportError(Exception):
    """A file that is not a voxtral-run trace."""


def read_profile(path: Path) -> Profile:
    """The stages' slices and the latency counter of a trace file."""
    try:
        events = json.loads(path.read_text())["traceEvents"]
    except OSError as error:
        raise ReportError(f"{path}: cannot read ({error.strerror})") from None
    except (ValueError, KeyError, TypeError):
        raise ReportError(f"{path}: not a Chrome trace (a JSON object with traceEvents)") from None
    names = {event["tid"]: event["args"]["name"] for event in events if event.get("name") == "thread_name"}
    order = {event["tid"]: event["args"]["sort_index"] for event in events if event.get("name") == "thread_sort_index"}
    tids = sorted(names, key=lambda tid: order.get(tid, tid))
    stages = {names[tid]: StageTrack() for tid in tids}
    latencies = []
    for event in events:
        if event.get("ph") == "X" and event.get("tid") in names:
            track = stages[names[event["tid"]]]
            span = (event["ts"] / US, event["dur"] / US)
            if event["name"] == BLOCKED_SLICE:
                track.blocked.append(span)
            else:
                track.busy.append(span)
                track.service_ms.append(event["dur"] / US * MS)
                track.wait_ms += event.get("args", {}).get("waits_ms", [])
        elif event.get("ph") == "C" and event.get("name") == E2E_COUNTER:
            latencies.append((event["ts"] / US, event["args"]["latency_ms"]))
    if not stages:
        raise ReportError(f"{path}: no stage tracks (was it written by voxtral-run --profile?)")
    return Profile(stages, latencies)


def _distribution(axis, values: dict[str, list[float]], title: str) -> None:
    shown = {name: samples for name, samples in values.items() if samples}
    axis.set_title(title)
    if not shown:
        axis.text(0.5, 0.5, "no samples", ha="center", va="center", transform=axis.transAxes)
        return
    floored = [[max(sample, SHORTEST_MS) for sample in samples] for samples in shown.values()]
    axis.boxplot(floored, orientation="horizontal", whis=(1, 99), showfliers=False)
    axis.set_yticks(range(1, len(shown) + 1), list(shown))
    axis.invert_yaxis()  # pipeline order from the top, as in the timeline
    axis.set_xscale("log")
    axis.set_xlabel("ms, log scale (box: p25-p75, whiskers: p1-p99)")


def draw_report(profile: Profile, output: Path) -> None:
    """Write the PNG: timeline on top, service and wait distributions, then end-to-end latency."""
    stage_count = len(profile.stages)
    timeline_height = max(PANEL_HEIGHT_IN, TRACK_HEIGHT_IN * stage_count + 1)
    figure = plt.figure(figsize=(FIGURE_WIDTH_IN, timeline_height + 2 * PANEL_HEIGHT_IN), dpi=DPI)
    grid = figure.add_gridspec(3, 2, height_ratios=[timeline_height, PANEL_HEIGHT_IN, PANEL_HEIGHT_IN])
    timeline = figure.add_subplot(grid[0, :])
    for row, track in enumerate(profile.stages.values()):
        timeline.broken_barh(track.busy, (row - 0.35, 0.7), facecolors=f"C{row % 10}")
        timeline.broken_barh(track.blocked, (row - 0.35, 0.7), facecolors="0.75")
    timeline.set_yticks(range(stage_count), list(profile.stages))
    timeline.invert_yaxis()
    timeline.set_xlabel("s from the stream's start (colour: busy, grey: sending, blocked on a full queue included)")
    timeline.set_title("Stages over time")
    _distribution(
        figure.add_subplot(grid[1, 0]), {n: t.service_ms for n, t in profile.stages.items()}, "Service time per step"
    )
    _distribution(figure.add_subplot(grid[1, 1]), {n: t.wait_ms for n, t in profile.stages.items()}, "Queue wait")
    histogram, over_time = figure.add_subplot(grid[2, 0]), figure.add_subplot(grid[2, 1])
    histogram.set_title("End-to-end latency (capture to text, beyond the delay)")
    over_time.set_title("End-to-end latency over the stream")
    if profile.latencies:
        arrivals, latencies = zip(*profile.latencies, strict=True)
        histogram.hist(latencies, bins=min(50, max(5, len(latencies) // 4)), color="C0")
        histogram.set_xlabel("ms")
        histogram.set_ylabel("deltas")
        over_time.plot(arrivals, latencies, ".", color="C0")
        over_time.set_xlabel("s from the stream's start")
        over_time.set_ylabel("ms")
    else:
        for axis in (histogram, over_time):
            axis.text(0.5, 0.5, "no text at this host", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    figure.savefig(output)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="trace file written by voxtral-run --profile")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: the trace's name with .png)")
    args = parser.parse_args(argv)
    output = args.output or args.trace.with_suffix(".png")
    try:
        draw_report(read_profile(args.trace), output)
    except ReportError as error:
        print(f"profile_report: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"profile_report: {output}: cannot write ({error.strerror})", file=sys.stderr)
        return 1
    print(f"profile_report: wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
