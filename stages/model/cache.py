"""The KV cache of a transformer stack: preallocated rings of keys and values, batch-first.

Every layer keeps, for each row of the batch (one stream), a ring of `capacity` slots (slot = position %
capacity) with the absolute position each slot holds. The addresses never change, so a step can be replayed as
a CUDA graph, and attention reads only the filled prefix, rounded up to a power of two (the span), until the
ring wraps. A query attends to keys within its sliding window, itself included, so the ring keeps the last
`window - 1` positions plus room for one block of new ones.
"""

from __future__ import annotations

import torch

MIN_SPAN = 64  # the smallest prefix attention reads; spans double from here
SLOT_ALIGNMENT = 64  # capacities are whole multiples, which attention kernels read best


def span_for(total_positions: int, capacity: int) -> int:
    """Slots to read once `total_positions` positions exist: a power of two from MIN_SPAN, at most capacity."""
    span = MIN_SPAN
    while span < total_positions and span < capacity:
        span *= 2
    return min(span, capacity)


class KVCache:
    """Keys and values [layers, rows, capacity, kv_heads, head_dim] and the positions [rows, capacity] their slots
    hold. A forward over new positions calls `prepare` (on the host), `begin`, then `update` for each layer."""

    def __init__(
        self,
        window: int,
        block: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        rows: int = 1,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.window = window
        self.capacity = -(-(window - 1 + block) // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.keys = torch.zeros(n_layers, rows, self.capacity, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        # Empty slots hold a position no query is ever within the window of.
        empty = -2 * self.capacity - window
        self.positions = torch.full((rows, self.capacity), empty, dtype=torch.long, device=device)
        self.slots: torch.Tensor | None = None  # [rows, T] the slots of the forward's positions
        self.filled = 0
        self.span = 0

    def prepare(self, total_positions: int) -> None:
        """Before a forward after which each row holds `total_positions` positions: the span it reads."""
        self.filled = min(total_positions, self.capacity)
        self.span = span_for(total_positions, self.capacity)

    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        """Enter the new positions [rows, T] into their slots; the key positions [rows, span] attention reads."""
        self.slots = positions % self.capacity
        self.positions.scatter_(1, self.slots, positions)
        return self.positions[:, : self.span]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a layer's new keys and values [rows, T, kv_heads, head_dim] into their slots; the layer's keys
        and values [rows, span, kv_heads, head_dim] attention reads (the mask drops stale and empty slots)."""
        index = self.slots[:, :, None, None].expand_as(keys)
        self.keys[layer].scatter_(1, index, keys)
        self.values[layer].scatter_(1, index, values)
        return self.keys[layer, :, : self.span], self.values[layer, :, : self.span]

    def spans(self) -> list[int]:
        """Every span `prepare` can choose, smallest first."""
        spans = [span_for(1, self.capacity)]
        while spans[-1] < self.capacity:
            spans.append(span_for(spans[-1] + 1, self.capacity))
        return spans

    def __len__(self) -> int:
        """Positions a new query can still see, at most `window - 1`."""
        return min(self.filled, self.window - 1)
