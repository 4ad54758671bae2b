"""The run's figures as Prometheus metrics on an HTTP endpoint (--metrics-port), for long-running deployments.

The endpoint has its own registry and reads the runner's figures at each scrape: the stages' last reports (sent
every REPORT_EVERY_S while the endpoint is on) and the end-to-end latencies seen at the sink.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from voxtral_run.runner.errors import RunnerError
from voxtral_run.runner.metrics import BUCKETS_PER_DECADE, TIMES, LogHistogram, RunFigures, bucket_of, upper_bound
from voxtral_run.runner.stage_process import MAX_MESSAGES_PER_STEP

REPORT_EVERY_S = 1.0  # how often stages report while the endpoint is on
# Histogram buckets: quarter decades from 100 µs to 100 s, each an edge of the stages' own log histograms, so
# the cumulative counts are exact.
FIRST_EDGE_S, LAST_EDGE_S = 1e-4, 1e2
BUCKET_EDGES_S = tuple(
    upper_bound(index) for index in range(bucket_of(FIRST_EDGE_S), bucket_of(LAST_EDGE_S) + 1, BUCKETS_PER_DECADE // 4)
)
TIME_HELP = {
    "wait": "Time each message waited in the stage's input queue",
    "service": "Time the stage took per step (a call over the messages waiting)",
    "send": "Time the stage spent putting a step's outputs on its output queue (blocked time included)",
    "device": "GPU time per step (CUDA events)",
}
# Batch sizes: powers of two up to the most messages one step takes.
BATCH_EDGES = tuple(2**power for power in range(MAX_MESSAGES_PER_STEP.bit_length()))


def _buckets(histogram: LogHistogram) -> list[tuple[str, float]]:
    edges = [(f"{edge:.3g}", histogram.count_at_most(edge)) for edge in BUCKET_EDGES_S]
    return edges + [("+Inf", histogram.count)]


def _batch_buckets(rows: dict[int, int]) -> list[tuple[str, float]]:
    """Cumulative counts of batched computations by their rows, at BATCH_EDGES."""
    edges = [(str(edge), sum(count for size, count in rows.items() if size <= edge)) for edge in BATCH_EDGES]
    return edges + [("+Inf", sum(rows.values()))]


class RunCollector:
    """Builds the metric families from the runner's figures at each scrape."""

    def __init__(self, figures: Callable[[], RunFigures]):
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        figures = self._figures()
        stage, queue = ["stage"], ["stage", "queue"]
        items = CounterMetricFamily(
            "voxtral_stage_items", "Messages a stage took (80 ms frames, stream ends)", labels=stage
        )
        steps = CounterMetricFamily(
            "voxtral_stage_steps", "Stage calls, each over the messages waiting for the stage", labels=stage
        )
        batch = HistogramMetricFamily(
            "voxtral_stage_batch_rows", "Rows of each batched computation of a stage's steps", labels=stage
        )
        busy = CounterMetricFamily("voxtral_stage_busy_seconds", "Service time a stage spent on items", labels=stage)
        out_bytes = CounterMetricFamily("voxtral_stage_output_bytes", "Bytes a stage sent downstream", labels=stage)
        utilisation = GaugeMetricFamily(
            "voxtral_stage_utilisation_ratio", "Busy time over the stream's wall time", labels=stage
        )
        times = {
            name: HistogramMetricFamily(f"voxtral_stage_{name}_seconds", TIME_HELP[name], labels=stage)
            for name in TIMES
        }
        sent = CounterMetricFamily("voxtral_queue_sent", "Messages put on a stage's output queue", labels=queue)
        dropped = CounterMetricFamily("voxtral_queue_dropped", "Messages a drop-policy queue discarded", labels=queue)
        peak = GaugeMetricFamily("voxtral_queue_peak_depth", "Most messages the queue has held", labels=queue)
        capacity = GaugeMetricFamily("voxtral_queue_capacity", "Messages the queue may hold", labels=queue)
        kv_used = GaugeMetricFamily(
            "voxtral_kv_pages_in_use", "KV memory pages a model stage's streams hold", labels=stage
        )
        kv_pages = GaugeMetricFamily("voxtral_kv_pages", "KV memory pages of a model stage's pool", labels=stage)
        captured = CounterMetricFamily(
            "voxtral_graph_captures", "CUDA graphs a model stage captured after its warm-up", labels=stage
        )
        capture_s = CounterMetricFamily(
            "voxtral_graph_capture_seconds", "Host time those captures took, steps waiting meanwhile", labels=stage
        )
        for name, report in figures.stages.items():
            if "kv" in report:
                kv_used.add_metric([name], report["kv"]["pages_in_use"])
                kv_pages.add_metric([name], report["kv"]["pages"])
            if "graphs" in report:
                captured.add_metric([name], report["graphs"]["captured"])
                capture_s.add_metric([name], report["graphs"]["capture_s"])
            metrics = report.get("metrics", {})
            items.add_metric([name], metrics.get("items", 0))
            steps.add_metric([name], metrics.get("steps", 0))
            rows = {int(size): int(count) for size, count in metrics.get("batch_counts", [])}
            if rows:
                batch.add_metric([name], _batch_buckets(rows), sum(size * count for size, count in rows.items()))
            busy.add_metric([name], metrics.get("busy_s", 0.0))
            out_bytes.add_metric([name], metrics.get("out_bytes", 0))
            utilisation.add_metric([name], figures.utilisation(name))
            for time_name, wire in metrics.get("histograms", {}).items():
                histogram = LogHistogram.from_wire(wire)
                if histogram.count:
                    times[time_name].add_metric([name], _buckets(histogram), histogram.total)
            if "edge" in report:
                labels = [name, report["edge"]]
                sent.add_metric(labels, report["sent"])
                dropped.add_metric(labels, report["dropped"])
                peak.add_metric(labels, report["peak_depth"])
                capacity.add_metric(labels, report["capacity"])
        yield from (items, steps, busy, out_bytes, utilisation, *times.values(), batch, sent, dropped, peak, capacity)
        yield from (kv_used, kv_pages, captured, capture_s)
        yield GaugeMetricFamily("voxtral_stream_seconds", "Wall time of the stream so far", value=figures.wall_s)
        if figures.e2e is not None:
            e2e = HistogramMetricFamily(
                "voxtral_end_to_end_latency_seconds",
                "Audio captured to its text at the sink, beyond the configured delay",
                buckets=_buckets(figures.e2e),
                sum_value=figures.e2e.total,
            )
            yield e2e


class MetricsEndpoint:
    """An HTTP server on its own thread that answers Prometheus scrapes with the run's figures."""

    def __init__(self, host: str, port: int, figures: Callable[[], RunFigures]):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RunCollector(figures))
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            raise RunnerError(f"--metrics-port {port}: cannot listen on {host}:{port} ({error.strerror})") from None

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
