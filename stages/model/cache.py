"""KV memory shared by many streams: a pool of pages of keys and values, and the cache a forward reads through.

Each stream (a row of the pool) sees a ring of `capacity` slots (slot = position % capacity) holding its last
`window - 1` positions plus room for one block of new ones. The ring is cut into pages of PAGE_SLOTS slots, and
a stream's page table maps its ring's pages to pages of the pool, allocated as the stream grows and freed when
it ends: a short stream holds a few pages, a long one at most `capacity / PAGE_SLOTS`. The pool's tensors never
move, so a step can be replayed as a CUDA graph, and attention reads each row's filled prefix, rounded up to a
power of two (the span), until its ring wraps. A query attends to keys within its sliding window, itself
included; slots no position filled yet are masked by their empty position. A pool of dtype FP8 stores each
key and value vector (a KV head's at one slot) in e4m3 with a float32 scale beside it (`fp8.quantize`): half
the memory of bf16, read back within e4m3's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from voxtral_run.stages.model.fp8 import FP8, dequantize, store_quantized

PAGE_SLOTS = 64  # slots a page holds: attention's tile of keys, and the smallest span
MIN_SPAN = PAGE_SLOTS  # the smallest prefix attention reads; spans double from here
EMPTY_PAGE = 0  # never written: a ring page not allocated yet reads it (zeros, masked)
SCRATCH_PAGE = 1  # where the padded rows of a batch write, never a stream's
RESERVED_PAGES = 2


class PoolFull(Exception):
    """A stream needs a page and the pool has none free (it outgrew its reservation)."""


def span_for(total_positions: int, capacity: int) -> int:
    """Slots to read once `total_positions` positions exist: a power of two from MIN_SPAN, at most capacity."""
    span = MIN_SPAN
    while span < total_positions and span < capacity:
        span *= 2
    return min(span, capacity)


def all_spans(capacity: int) -> list[int]:
    """Every span `span_for` gives for a ring of `capacity` slots, shortest first."""
    spans = [MIN_SPAN]
    while spans[-1] < capacity:
        spans.append(min(2 * spans[-1], capacity))
    return spans


def page_bytes(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values one page holds, all layers (in FP8, their float32 scales included)."""
    vector = head_dim * dtype.itemsize + (torch.float32.itemsize if dtype == FP8 else 0)
    return 2 * n_layers * PAGE_SLOTS * n_kv_heads * vector


def ring_capacity(window: int, block: int) -> int:
    """Slots of a stream's ring: the last `window - 1` positions plus one block of new ones, in whole pages."""
    return -(-(window - 1 + block) // PAGE_SLOTS) * PAGE_SLOTS


class KVPool:
    """Pages of keys and values [layers, pages, PAGE_SLOTS, kv_heads, head_dim] shared by up to `max_streams`
    rows, each with its page table and the positions its ring's slots hold; one more row, the scratch row, is
    where a batch's padding rows compute. In FP8, `scales` holds the keys' and values' scales [layers, pages,
    PAGE_SLOTS, kv_heads] (else None)."""

    def __init__(
        self,
        window: int,
        block: int,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        max_streams: int,
        pages: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.window = window
        self.capacity = ring_capacity(window, block)
        self.pages_per_stream = self.capacity // PAGE_SLOTS
        self.max_streams = max_streams
        self.scratch_row = max_streams
        shape = (n_layers, RESERVED_PAGES + pages, PAGE_SLOTS, n_kv_heads, head_dim)
        # Unwritten memory may hold NaN, which a masked key's zero weight would still spread: pages are zeroed as
        # they are first handed out (`_fresh`), so a short-lived pool on a CPU commits only what it uses.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.scales = None
        if dtype == FP8:
            self.scales = tuple(torch.empty(shape[:-1], dtype=torch.float32, device=device) for _ in "kv")
        for tensor in self._stored():
            tensor[:, :RESERVED_PAGES].zero_()
        self.table = torch.full((max_streams + 1, self.pages_per_stream), EMPTY_PAGE, dtype=torch.long, device=device)
        self.table[self.scratch_row] = SCRATCH_PAGE
        self.empty_position = -2 * self.capacity - window  # no query is ever within the window of it
        self.positions = torch.full(
            (max_streams + 1, self.capacity), self.empty_position, dtype=torch.long, device=device
        )
        self._free_rows = list(range(max_streams - 1, -1, -1))  # popped from the end: lowest row first
        self._free_pages = list(range(RESERVED_PAGES + pages - 1, RESERVED_PAGES - 1, -1))
        self._fresh = set(self._free_pages)
        self._row_pages: dict[int, list[int]] = {}
        self._reserved: dict[int, int] = {}  # pages promised to a row and not yet allocated

    def _stored(self) -> tuple[torch.Tensor, ...]:
        """Every tensor a page has a part of: keys, values and, in FP8, their scales."""
        return (self.keys, self.values, *(self.scales or ()))

    @property
    def total_pages(self) -> int:
        """Pages streams can hold (the reserved ones not counted)."""
        return self.keys.shape[1] - RESERVED_PAGES

    @property
    def pages_in_use(self) -> int:
        return self.total_pages - len(self._free_pages)

    @property
    def rows_in_use(self) -> int:
        return len(self._row_pages)

    def page_bytes(self) -> int:
        """Bytes of keys and values one page holds, all layers."""
        layers, _, _, kv_heads, head_dim = self.keys.shape
        return page_bytes(layers, kv_heads, head_dim, self.keys.dtype)

    def pages_for(self, positions: int) -> int:
        """Pages a stream holding `positions` positions uses."""
        return min(-(-positions // PAGE_SLOTS), self.pages_per_stream)

    def admit(self, reserve_positions: int) -> int | None:
        """A row for a new stream with pages for `reserve_positions` positions set aside, or None when every row
        is taken or the unpromised free pages are too few."""
        wanted = self.pages_for(reserve_positions)
        if not self._free_rows or len(self._free_pages) - sum(self._reserved.values()) < wanted:
            return None
        row = self._free_rows.pop()
        self._row_pages[row] = []
        self._reserved[row] = wanted
        return row

    def release(self, row: int) -> None:
        """Free a row and its pages at once; its ring reads empty to whoever takes it next."""
        pages = self._row_pages.pop(row)
        self._reserved.pop(row)
        self._free_pages.extend(reversed(pages))
        self.table[row, : len(pages)] = EMPTY_PAGE
        self.positions[row].fill_(self.empty_position)
        self._free_rows.append(row)

    def grow(self, row: int, total_positions: int) -> None:
        """Allocate the pages a row needs to hold `total_positions` positions (from its reservation first);
        PoolFull when the pool has none left."""
        pages = self._row_pages[row]
        wanted = self.pages_for(total_positions)
        if len(pages) >= wanted:
            return
        unpromised = len(self._free_pages) - sum(self._reserved.values())
        if wanted - len(pages) > self._reserved[row] + unpromised:
            raise PoolFull(f"KV memory full: a stream needs a page and all {self.total_pages} are in use")
        new = [self._free_pages.pop() for _ in range(wanted - len(pages))]
        self._reserved[row] = max(0, self._reserved[row] - len(new))
        fresh = [page for page in new if page in self._fresh]
        if fresh:
            self._fresh.difference_update(fresh)
            for tensor in self._stored():
                tensor[:, fresh] = 0
        self.table[row, len(pages) : wanted] = torch.tensor(new, dtype=torch.long).to(self.table.device)
        pages.extend(new)

    def cache(self, rows: Sequence[int] | torch.Tensor) -> KVCache:
        """The cache of a batch of rows (a stream's row, or the scratch row for padding)."""
        return KVCache(self, rows)


class KVCache:
    """The KV cache of a batch of a pool's rows: what a forward over new positions reads and writes. Call
    `prepare` (on the host), then `begin`, then `update` for each layer."""

    def __init__(self, pool: KVPool, rows: Sequence[int] | torch.Tensor) -> None:
        self.pool = pool
        # The host's copy of the rows, unless they are a device buffer a step fills (then `prepare` is told them).
        self.host_rows = None if isinstance(rows, torch.Tensor) else list(rows)
        self.window = pool.window
        self.capacity = pool.capacity
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=pool.table.device)
        self.span = 0
        self.slots: torch.Tensor | None = None  # [rows, T] the pool slots (page * PAGE_SLOTS + offset) written
        self.pages: torch.Tensor | None = None  # [rows, span / PAGE_SLOTS] the pages attention reads

    def prepare(self, totals: int | Sequence[int], rows: Sequence[int] | None = None) -> None:
        """Before a forward after which the batch's rows hold `totals` positions each (one figure: all of them):
        their pages and the span, the longest row's. `rows`: the rows, when the cache's are a device buffer."""
        rows = self.host_rows if rows is None else rows
        totals = [totals] * len(rows) if isinstance(totals, int) else totals
        for row, total in zip(rows, totals, strict=True):
            if row != self.pool.scratch_row:
                self.pool.grow(row, total)
        self.span = max(span_for(total, self.capacity) for total in totals)

    def begin(self, positions: torch.Tensor) -> torch.Tensor:
        """Enter the new positions [rows, T] into their slots; the key positions [rows, span] attention reads."""
        ring_slots = positions % self.capacity
        rows = self.rows[:, None].expand_as(positions)
        self.pool.positions[rows, ring_slots] = positions
        self.slots = self.pool.table[rows, ring_slots // PAGE_SLOTS] * PAGE_SLOTS + ring_slots % PAGE_SLOTS
        self.pages = self.pool.table[self.rows, : self.span // PAGE_SLOTS]
        return self.pool.positions[self.rows, : self.span]

    def layer_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and values as [pool slots, kv_heads, head_dim], which `slots` index."""
        return self.pool.keys[layer].flatten(0, 1), self.pool.values[layer].flatten(0, 1)

    def layer_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """In FP8, a layer's key and value scales as [pool slots, kv_heads]; else None."""
        if self.pool.scales is None:
            return None
        return tuple(scales[layer].flatten(0, 1) for scales in self.pool.scales)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a layer's new keys and values [rows, T, kv_heads, head_dim] into their slots; the layer's keys
        and values [rows, span, kv_heads, head_dim] attention reads (the mask drops stale and empty slots), in
        the new keys' dtype."""
        slots = self.slots.flatten()
        scales = self.layer_scales(layer)
        for index, (stored, new) in enumerate(zip(self.layer_slots(layer), (keys, values), strict=True)):
            new = new.flatten(0, 1)
            if scales is None:
                stored.index_copy_(0, slots, new.to(stored.dtype))
            else:
                store_quantized(new, stored, scales[index], slots)
        batch, dtype, pool = (self.rows.shape[0], self.span, *keys.shape[2:]), keys.dtype, self.pool
        if pool.scales is None:
            return pool.keys[layer][self.pages].view(batch), pool.values[layer][self.pages].view(batch)
        read_keys, read_values = (
            dequantize(stored[layer][self.pages], scales[layer][self.pages], dtype).view(batch)
            for stored, scales in zip((pool.keys, pool.values), pool.scales, strict=True)
        )
        return read_keys, read_values


def single_stream_cache(
    window: int, block: int, n_layers: int, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
    device: torch.device | str, rows: int = 1,
) -> KVCache:  # fmt: skip
    """The cache of `rows` streams in a pool of their own, with pages for their whole windows."""
    capacity = ring_capacity(window, block)
    pool = KVPool(
        window, block, n_layers, n_kv_heads, head_dim, max_streams=rows, pages=rows * capacity // PAGE_SLOTS,
        dtype=dtype, device=device,
    )  # fmt: skip
    return pool.cache([pool.admit(window) for _ in range(rows)])
