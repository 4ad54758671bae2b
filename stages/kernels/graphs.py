"""CUDA graph capture of fixed-shape steps, one graph per shape (cache span), replayed without launch overhead."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import numpy as np
import torch


class GraphPool:
    """What the graphs of a stage's steps share: one memory pool (the steps never run at once), and a tally of
    their captures, each of which stalls the step that meets a new shape (it runs eagerly, then is recorded)."""

    def __init__(self) -> None:
        self.handle = torch.cuda.graph_pool_handle()
        self.captured = 0
        self.capture_s = 0.0  # host time the captures took, their eager runs included


class StepGraphs:
    """Runs `step` (which reads and writes only fixed buffers) as a CUDA graph captured lazily per key.

    The first call for a key runs the step eagerly on a side stream (warm-up, as capture requires; its
    results are the real ones), then captures it; later calls replay the graph. Capture and replay run with
    the step's device current: streams belong to a device, and a stream of another GPU would capture nothing.
    Without `capture`, or on a CPU device, the step just runs (same buffers), so its logic runs in tests.
    """

    def __init__(
        self, step: Callable[[], None], device: torch.device, capture: bool = True, pool: GraphPool | None = None
    ) -> None:
        self.step = step
        self.device = device
        self.capture = capture and device.type == "cuda"
        self.pool = pool  # shared with other steps' graphs, and counting this one's captures
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}

    def __call__(self, key: Hashable) -> None:
        if self.device.type != "cuda":
            self.step()
            return
        with torch.cuda.device(self.device):  # the step's Triton kernels launch on the current device
            if self.capture:
                self._run(key)
            else:
                self.step()

    def _run(self, key: Hashable) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        began = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=None if self.pool is None else self.pool.handle):
            self.step()
        self._graphs[key] = graph
        if self.pool is not None:
            self.pool.captured += 1
            self.pool.capture_s += time.perf_counter() - began

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        """Whether the graph of `key` is captured."""
        return key in self._graphs


class StagedInput:
    """A step's input, staged in page-locked host memory: the host writes it (`load`) and the step, captured
    with it, copies it to the device and converts it there (`copy_in`), so a replay needs no transfer call and
    no conversion of its own on the host."""

    def __init__(self, buffer: torch.Tensor, host_dtype: torch.dtype = torch.float32) -> None:
        self.buffer = buffer
        self.host = torch.empty(buffer.shape, dtype=host_dtype, pin_memory=buffer.is_cuda)
        self._host_array = self.host.numpy()
        # The transfer keeps the host's dtype: torch converts a host-to-device copy on the host, which a
        # captured graph would freeze at its capture-time values.
        self._landing = (
            buffer if buffer.dtype == host_dtype else torch.empty(buffer.shape, dtype=host_dtype, device=buffer.device)
        )

    def load(self, values: np.ndarray | torch.Tensor) -> None:
        """Write the next step's input. The previous step must be over (its `StagedOutput` read): it reads this."""
        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", self.host.dtype).numpy()
        if values.shape != self._host_array.shape:  # copyto would broadcast a row to all rows
            raise ValueError(f"staged input: expected shape {list(self._host_array.shape)}, got {list(values.shape)}")
        np.copyto(self._host_array, values, casting="same_kind")

    def load_rows(self, values: np.ndarray) -> None:
        """Write the next step's input for a batch's first rows, zeros in the padding rows after them."""
        padded = np.zeros(self._host_array.shape, dtype=self._host_array.dtype)
        padded[: len(values)] = values
        self.load(padded)

    def copy_in(self) -> None:
        """In the step: move the loaded values into `buffer`."""
        self._landing.copy_(self.host, non_blocking=True)
        if self._landing is not self.buffer:
            self.buffer.copy_(self._landing)


class StagedOutput:
    """A step's output, sent to page-locked host memory by the step itself (`copy_out`, captured with it) and
    read by the host once the step is done (`read`): one event to wait on instead of a conversion kernel and a
    transfer launched after the replay."""

    def __init__(self, like: torch.Tensor, host_dtype: torch.dtype) -> None:
        self.host = torch.empty(like.shape, dtype=host_dtype, pin_memory=like.is_cuda)
        self._host_array = self.host.numpy()
        self._converted = (
            None if like.dtype == host_dtype else torch.empty(like.shape, dtype=host_dtype, device=like.device)
        )
        self._device = like.device
        self._sent = torch.cuda.Event() if like.is_cuda else None

    def copy_out(self, values: torch.Tensor) -> None:
        """In the step: send `values` to the host buffer (converted on the device, as in `StagedInput`)."""
        if self._converted is not None:
            values = self._converted.copy_(values)
        self.host.copy_(values, non_blocking=True)

    def read(self) -> np.ndarray:
        """A copy of what the last step sent, once the device has sent it."""
        if self._sent is not None:
            self._sent.record(torch.cuda.current_stream(self._device))
            self._sent.synchronize()
        return self._host_array.copy()
