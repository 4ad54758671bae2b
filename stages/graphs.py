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


class StagedInput:
    """A graph's input buffer on its device and a page-locked host copy: a host array is converted to the
    buffer's dtype on the CPU and copied in asynchronously, with no kernel of its own (about 40 us less host
    time per step than moving and converting it with torch on an H200)."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.host = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=buffer.is_cuda)
        self._copied = torch.cuda.Event() if buffer.is_cuda else None

    def load(self, values: torch.Tensor) -> None:
        """Copy `values` (any dtype and device) into the buffer, ahead of the next graph replay."""
        if values.device != self.host.device:
            self.buffer.copy_(values)
            return
        if self._copied is not None:
            self._copied.synchronize()  # the last copy must have left the host buffer before it is overwritten
        self.host.copy_(values)
        self.buffer.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()


class StepPosition:
    """A graph's position input on its device, which each replay advances itself (`advance_on_device`); the
    host writes it only when a step ran outside the graph since."""

    def __init__(self, tensor: torch.Tensor, step: int) -> None:
        self.tensor = tensor
        self.step = step
        self._next: int | None = None  # what the device holds, when known

    def set(self, position: int) -> None:
        """Make the device hold `position` for the coming replay, which leaves `position + step` there."""
        if self._next != position:
            self.tensor.fill_(position)
        self._next = position + self.step

    def advance_on_device(self) -> None:
        """In the step: move the position on by one step, for the next replay."""
        self.tensor.add_(self.step)
