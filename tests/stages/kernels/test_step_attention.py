"""The split-key step attention kernels (in Triton's CPU interpreter here) compute what SDPA computes."""

from __future__ import annotations

import pytest
import torch

from voxtral_run.stages.kernels.fused import attend, sdpa_attention
from voxtral_run.stages.kernels.overlap import DEFAULT_OVERLAP
from voxtral_run.stages.kernels.step_attention import (
    BLOCK_KEYS,
    MAX_SLICE_TILES,
    MERGE_SLICES,
    key_splits,
    split_tickets,
    step_attention,
    step_attention_available,
)
from voxtral_run.stages.model.cache import EMPTY_PAGE
from voxtral_run.stages.model.fp8 import dequantize, quantize
from voxtral_run.stages.model.layers import attention_bias

pytestmark = pytest.mark.skipif(
    not step_attention_available(torch.device("cpu")), reason="needs Triton (the dev extra installs it)"
)

# (query heads, KV heads, positions per step, head dim, cached keys, window): an encoder step (4 frames,
# no grouping), a decoder step (1 position, groups of 4), and key counts that leave a partial last tile.
SHAPES = [(4, 4, 4, 16, 200, 150), (8, 2, 1, 32, 300, 1000), (4, 1, 4, 16, 70, 40), (2, 2, 1, 16, 5, 8)]


def ring_step(heads, kv_heads, length, head_dim, n_keys, window, dtype, seed=0):
    """A step's queries over a ring of cached keys in scrambled slot order, some of them outside the window."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(length, heads, head_dim, generator=generator).to(dtype).transpose(0, 1)
    keys, values = (torch.randn(n_keys, kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    first = n_keys + window // 2
    positions = torch.arange(first, first + length)
    key_positions = torch.randperm(first, generator=generator)[:n_keys]
    key_positions[torch.randperm(n_keys, generator=generator)[:length]] = positions  # the step's own keys
    return q, keys, values, attention_bias(positions[None], key_positions[None], window, dtype)[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_step_attention_equals_sdpa_in_float32(shape) -> None:
    q, keys, values, bias = ring_step(*shape, torch.float32)
    torch.testing.assert_close(step_attention(q, keys, values, bias), sdpa_attention(q, keys, values, bias))


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_step_attention_in_bf16_is_within_bf16_rounding_of_exact(shape) -> None:
    q, keys, values, bias = ring_step(*shape, torch.bfloat16, seed=1)
    ours = step_attention(q, keys, values, bias)
    exact = sdpa_attention(q.double(), keys.double(), values.double(), bias.double())
    assert ours.dtype == torch.bfloat16
    assert ((ours.double() - exact).norm() / exact.norm()).item() < 4e-3


def test_a_long_cache_is_merged_a_chunk_of_slices_at_a_time() -> None:
    """More slices than the merge loads at once, visible keys in each chunk: a later chunk's larger maximum
    rescales what the earlier chunks added."""
    q, keys, values, bias = ring_step(8, 2, 1, 16, 2200, 3000, torch.float32, seed=4)
    assert key_splits(keys.shape[0], keys.shape[1])[0] > 2 * MERGE_SLICES
    torch.testing.assert_close(step_attention(q, keys, values, bias), sdpa_attention(q, keys, values, bias))


def test_slices_wholly_outside_the_window_add_nothing() -> None:
    """Only the newest keys are visible, so most slices of the keys hold no visible key at all."""
    heads, kv_heads, head_dim, n_keys = 4, 4, 16, 40 * BLOCK_KEYS
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(heads, 1, head_dim, generator=generator)
    keys, values = (torch.randn(n_keys, kv_heads, head_dim, generator=generator) for _ in range(2))
    bias = attention_bias(torch.tensor([[n_keys - 1]]), torch.arange(n_keys)[None], 3, torch.float32)[0]
    assert key_splits(n_keys, kv_heads)[0] > 1
    ours = step_attention(q, keys, values, bias)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, sdpa_attention(q, keys, values, bias))


def test_the_last_slice_to_finish_merges_and_leaves_the_counters_at_zero_for_the_next_launch() -> None:
    """Each KV head's last program merges its slices and resets the head's counter: later launches (and graph
    replays) see zeros and merge exactly once, to the same result."""
    q, keys, values, bias = ring_step(*SHAPES[1], torch.float32, seed=3)
    assert key_splits(keys.shape[0], keys.shape[1])[0] > 1
    first = step_attention(q, keys, values, bias)
    assert not split_tickets(q.device).any()
    assert torch.equal(step_attention(q, keys, values, bias), first)
    torch.testing.assert_close(first, sdpa_attention(q, keys, values, bias))


def test_output_is_position_major_for_the_output_projection() -> None:
    q, keys, values, bias = ring_step(*SHAPES[0], torch.float32)
    out = step_attention(q, keys, values, bias)
    assert out.transpose(0, 1).is_contiguous()


@pytest.mark.parametrize(
    ("n_keys", "kv_heads"), [(1, 8), (63, 8), (1024, 32), (8256, 8), (8256, 1), (8192, 110 * 8), (768, 110 * 32)]
)
def test_key_splits_cover_every_key_once_in_whole_tiles_of_bounded_slices(n_keys, kv_heads) -> None:
    """Also a batch's many rows (110 rows of 8 KV heads): their long windows in slices of at most
    MAX_SLICE_TILES tiles, though one slice each would already fill the GPU."""
    slices, per_slice = key_splits(n_keys, kv_heads)
    assert per_slice % BLOCK_KEYS == 0 and per_slice <= MAX_SLICE_TILES * BLOCK_KEYS
    assert (slices - 1) * per_slice < n_keys <= slices * per_slice


def paged(q, keys, values, bias, pages: list[int], slots: int):
    """A step's operands as one row of a KV pool: its keys laid out in the pool's pages `pages` (of `slots`
    slots, the others random), the bias padded to whole pages."""
    generator = torch.Generator().manual_seed(5)
    pool = [torch.randn(slots, *keys.shape[1:], generator=generator).to(keys.dtype) for _ in range(2)]
    padded = len(pages) * BLOCK_KEYS
    for stored, row in zip(pool, (keys, values), strict=True):
        for index, page in enumerate(pages):
            chunk = row[index * BLOCK_KEYS : (index + 1) * BLOCK_KEYS]
            stored[page * BLOCK_KEYS : page * BLOCK_KEYS + len(chunk)] = chunk
    bias = torch.nn.functional.pad(bias, (0, padded - bias.shape[-1]), value=float("-inf"))
    return q[None], pool[0], pool[1], bias[None], torch.tensor([pages])


def test_paged_rows_of_a_batch_each_read_their_own_pages() -> None:
    """Two rows of a batch, each with its keys scattered over the pool's pages in its own order (the other
    pages hold other streams' keys): each row's output is SDPA over its own keys."""
    steps = [ring_step(8, 2, 1, 32, 300, 1000, torch.float32, seed=seed) for seed in (6, 7)]
    tables = ([7, 2, 9, 10, 4], [1, 3, 11, 5, 6])  # never EMPTY_PAGE (0): a pool keeps no keys there
    operands = [paged(*step, pages, 12 * BLOCK_KEYS) for step, pages in zip(steps, tables, strict=True)]
    pool_keys, pool_values = operands[0][1], operands[0][2]
    for _, keys, values, _, pages in operands[1:]:  # one pool: the second row's pages into the first's tensors
        for page in pages[0].tolist():
            rows = slice(page * BLOCK_KEYS, (page + 1) * BLOCK_KEYS)
            pool_keys[rows], pool_values[rows] = keys[rows], values[rows]
    q = torch.cat([operand[0] for operand in operands])
    bias = torch.cat([operand[3] for operand in operands])
    pages = torch.cat([operand[4] for operand in operands])
    batched = step_attention(q, pool_keys, pool_values, bias, pages=pages)
    for row, step in enumerate(steps):
        torch.testing.assert_close(batched[row], sdpa_attention(*step))


def test_pages_a_row_has_not_reached_are_skipped() -> None:
    """A row's table past its keys points at EMPTY_PAGE, masked by the bias: the kernel skips those tiles, so even
    NaN there (a pool zeroes the page; NaN times a zero weight would spread) leaves the row's output SDPA's."""
    step = ring_step(8, 2, 1, 32, 150, 1000, torch.float32, seed=8)
    q, keys, values, bias, pages = paged(*step, [3, 5, 2], 6 * BLOCK_KEYS)
    for stored in (keys, values):
        stored[EMPTY_PAGE * BLOCK_KEYS : (EMPTY_PAGE + 1) * BLOCK_KEYS] = float("nan")
    unreached = torch.full((1, 3), EMPTY_PAGE)
    bias = torch.nn.functional.pad(bias, (0, 3 * BLOCK_KEYS), value=float("-inf"))
    out = step_attention(q, keys, values, bias, pages=torch.cat((pages, unreached), dim=1))
    torch.testing.assert_close(out[0], sdpa_attention(*step))


def test_attend_gathers_the_pages_for_sdpa_for_many_rows() -> None:
    """A block of many positions (a prompt) is no step: SDPA serves it, over the row's pages gathered."""
    step = ring_step(4, 4, 32, 16, 100, 100, torch.float32)
    q, keys, values, bias, pages = paged(*step, [3, 0], 4 * BLOCK_KEYS)
    torch.testing.assert_close(attend(q, keys, values, bias, pages, DEFAULT_OVERLAP)[0], sdpa_attention(*step))


@pytest.mark.parametrize("length", [1, 32], ids=["step", "prompt"])
def test_8_bit_keys_and_values_attend_as_their_dequantized_values(length) -> None:
    """Keys and values in e4m3 with a scale per slot and head: the kernel (a step's query rows) and the gathered
    SDPA (a prompt's) both compute attention over the dequantized keys and values (float32)."""
    step = ring_step(8, 2, length, 32, 150, 1000, torch.float32, seed=9)
    q, keys, values, bias, pages = paged(*step, [3, 5, 2], 6 * BLOCK_KEYS)
    (keys, key_scales), (values, value_scales) = quantize(keys), quantize(values)
    scales = (key_scales, value_scales)
    dequantized = [dequantize(t, s, torch.float32) for t, s in zip((keys, values), scales, strict=True)]
    ours = attend(q, keys, values, bias, pages, DEFAULT_OVERLAP, scales)
    torch.testing.assert_close(ours, attend(q, *dequantized, bias, pages, DEFAULT_OVERLAP))
