"""bf16 rounding of the elementwise layers follows the reference, bit for bit."""

from __future__ import annotations

import torch
from transformers.models.voxtral_realtime.modeling_voxtral_realtime import (
    VoxtralRealtimeRMSNorm,
    apply_rotary_pos_emb,
)

from voxtral_run.stages.model.layers import RMSNorm, RotaryEmbedding

HEAD_DIM = 64


def test_rms_norm_in_bf16_equals_the_reference_bit_for_bit() -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(7, 256)).bfloat16()
    weight = (1 + 0.5 * torch.randn(256)).bfloat16()
    ours, theirs = RMSNorm(256, 1e-5).bfloat16(), VoxtralRealtimeRMSNorm(256, eps=1e-5).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
        assert torch.equal(ours(x), theirs(x))


def test_rope_in_bf16_equals_the_reference_rotate_half_bit_for_bit() -> None:
    """Interleaved pairs (2i, 2i+1) are the reference's rotate-half pairs (i, i + head_dim/2), permuted."""
    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 2, 749, 5000, 123456])
    q, k = torch.randn(len(positions), 4, HEAD_DIM).bfloat16(), torch.randn(len(positions), 2, HEAD_DIM).bfloat16()
    rope = RotaryEmbedding(HEAD_DIM, 1e6)
    rotations = rope.rotations(positions[None], torch.bfloat16)  # a batch of one row
    ours_q, ours_k = RotaryEmbedding.apply(q[None], rotations)[0], RotaryEmbedding.apply(k[None], rotations)[0]

    def rotate_half_order(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] interleaved -> [1, H, T, D] halves
        return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1).transpose(0, 1)[None]

    # transformers' cos/sin: the same fp32 angles, each half repeated, rounded to bf16.
    angles = positions.float()[:, None] * rope.inv_freq[None, :]
    doubled = torch.cat((angles, angles), -1)
    cos, sin = doubled.cos().bfloat16()[None], doubled.sin().bfloat16()[None]
    theirs_q, theirs_k = apply_rotary_pos_emb(rotate_half_order(q), rotate_half_order(k), cos, sin)
    assert torch.equal(rotate_half_order(ours_q), theirs_q)
    assert torch.equal(rotate_half_order(ours_k), theirs_k)
