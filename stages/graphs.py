"""CUDA graph capture of fixed-shape steps, one graph per cache span, replayed without launch overhead."""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class StepGraphs:
    """Runs `step` (which reads and writes only fixed buffers) as a CUDA graph captured lazily per key.

    The first call for a key runs the step eagerly on a side stream (warm-up, as capture requires; its
    results are the real ones), then captures it; later calls replay the graph. Capture and replay run with
    the step's device current: streams belong to a device, and a stream of another GPU would capture nothing.
    On a CPU device the step just runs (same buffers, no capture), so the graphed steps' logic runs in tests.
    """

    def __init__(self, step: Callable[[], None], device: torch.device) -> None:
        self.step = step
        self.device = device
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}

    def __call__(self, key: Hashable) -> None:
        if self.device.type != "cuda":
            self.step()
            return
        with torch.cuda.device(self.device):
            self._run(key)

    def _run(self, key: Hashable) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        self._graphs[key] = graph

    def __len__(self) -> int:
        return len(self._graphs)
