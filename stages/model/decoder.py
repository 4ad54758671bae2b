"""The adapter and the text decoder: encoder frames, grouped four to a position, are projected to the
decoder's width and added to the previous token's embedding; the decoder's FFN inputs are scaled by the
delay conditioning (Ada RMSNorm); the LM head is the tied embedding matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voxtral_run.stages.model.cache import KVCache, single_stream_cache
from voxtral_run.stages.model.checkpoint import (
    ADAPTER_PREFIX,
    DECODER_PREFIXES,
    TOKEN_EMBEDDING,
    ModelDir,
    ModelParams,
)
from voxtral_run.stages.model.fp8 import Fp8Linear, quantize_linears
from voxtral_run.stages.model.layers import Block, RMSNorm, RotaryEmbedding, fuse_projections, position_inputs
from voxtral_run.stages.text.tekken import Tekken

TIME_EMBEDDING_THETA = 10_000.0
PREFILL_BLOCK = 64  # positions decoded in one forward at most (the longest prompt is 33 + 30 delay tokens)
# The layers' products that 8-bit weights store in e4m3; the adapter, the embeddings (also the LM head) and the
# delay MLP (run once per delay) keep the model's dtype.
FP8_LINEARS = ("wqkv", "wo", "w13", "w2")


def time_conditioning(num_delay_tokens: int, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sinusoidal embedding of the delay in tokens, cos half first; computed in `dtype` as the reference does
    (docs/MODEL.md §9, §10)."""
    half = dim // 2
    inv_freq = torch.exp(-math.log(TIME_EMBEDDING_THETA) * torch.arange(half).float() / half)
    t = torch.full((1,), float(num_delay_tokens), dtype=dtype, device=device)
    angles = t * inv_freq.to(device=device, dtype=dtype)
    return torch.cat((angles.cos(), angles.sin()))


def streaming_prompt(tekken: Tekken, num_delay_tokens: int) -> list[int]:
    """[BOS] + [STREAMING_PAD] x (left pad tokens + delay tokens): the forced ids of a stream's first positions."""
    return [tekken.bos_id] + [tekken.streaming_pad_id] * (tekken.audio.streaming_n_left_pad_tokens + num_delay_tokens)


class DecoderLayer(Block):
    """Decoder block; its FFN input is scaled by (1 + s), s from the delay conditioning."""

    def __init__(self, params: ModelParams) -> None:
        super().__init__(params.decoder)
        self.ada_rms_norm_t_cond = nn.Sequential(
            nn.Linear(params.decoder.dim, params.ada_norm_dim, bias=False),
            nn.GELU(),
            nn.Linear(params.ada_norm_dim, params.decoder.dim, bias=False),
        )


class TextDecoder(nn.Module):
    """Adapter, token embeddings (also the tied LM head, unless `lm_head` holds an 8-bit copy of them), decoder
    layers and final norm."""

    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        dec = params.decoder
        self.params = params
        self.adapter = nn.Sequential(
            nn.Linear(params.adapter_input_dim, dec.dim, bias=False),
            nn.GELU(),
            nn.Linear(dec.dim, dec.dim, bias=False),
        )
        # No random init: the module is built on the meta device and loaded (`load_text_decoder`), and a meta
        # normal_ goes through torch's reference ops, whose first call imports torch._dynamo (seconds of start-up).
        self.tok_embeddings = nn.Embedding(params.vocab_size, dec.dim, _weight=torch.empty(params.vocab_size, dec.dim))
        self.layers = nn.ModuleList(DecoderLayer(params) for _ in range(dec.n_layers))
        self.norm = RMSNorm(dec.dim, dec.norm_eps)
        self.rope = RotaryEmbedding(dec.head_dim, dec.rope_theta)
        self.lm_head: Fp8Linear | None = None

    def new_cache(self, rows: int = 1, block: int = PREFILL_BLOCK) -> KVCache:
        """An empty KV cache for `rows` streams whose forwards take at most `block` positions at once."""
        dec, weight = self.params.decoder, self.tok_embeddings.weight
        return single_stream_cache(
            dec.sliding_window, block, dec.n_layers, dec.n_kv_heads, dec.head_dim, rows=rows, dtype=weight.dtype,
            device=weight.device,
        )  # fmt: skip

    def ffn_scales(self, num_delay_tokens: int) -> list[torch.Tensor]:
        """(1 + s_j) for every layer: constant for a delay, so computed once, not per step."""
        weight = self.tok_embeddings.weight
        t_cond = time_conditioning(num_delay_tokens, self.params.decoder.dim, weight.dtype, weight.device)
        with torch.inference_mode():
            return [1 + layer.ada_rms_norm_t_cond(t_cond) for layer in self.layers]

    def adapt(self, frames: torch.Tensor) -> torch.Tensor:
        """Encoder frames [batch, 4n, enc_dim] -> adapter vectors [batch, n, dim]; frame 4p fills the first slot
        of position p."""
        return self.adapter(frames.reshape(frames.shape[0], -1, self.params.adapter_input_dim))

    def blocks(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, ffn_scales: list[torch.Tensor]
    ) -> torch.Tensor:
        """The decoder layers over x [batch, T, dim] at positions [batch, T] (before the final norm); the new
        keys and values enter the cache."""
        rotations, bias = position_inputs(positions, self.rope, cache, x.dtype)
        for index, (layer, scale) in enumerate(zip(self.layers, ffn_scales, strict=True)):
            x = layer(x, rotations, bias, cache, index, scale)
        return x

    def forward(
        self,
        audio: torch.Tensor,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        ffn_scales: list[torch.Tensor],
    ) -> torch.Tensor:
        """Hidden states [batch, T, dim] after the last layer (before the final norm) for adapter vectors and the
        previous tokens [batch, T] at positions [batch, T]; the new keys and values enter the cache."""
        return self.blocks(audio + self.tok_embeddings(token_ids), positions, cache, ffn_scales)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [batch, T, vocab] of `forward`'s hidden states: the final norm, then the LM head."""
        normed = self.norm(hidden)
        return F.linear(normed, self.tok_embeddings.weight) if self.lm_head is None else self.lm_head(normed)

    def next_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy ids [batch] after the last of `forward`'s hidden states."""
        return self.logits(hidden[:, -1]).argmax(-1)


def load_text_decoder(
    model: ModelDir,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    fp8_weights: bool = False,
    fp8_lm_head: bool = False,
) -> TextDecoder:
    """Build the adapter + decoder and load only their tensors (and the embeddings) from the model directory;
    with `fp8_weights`, the layers' FP8_LINEARS quantized to e4m3 per output channel; with `fp8_lm_head`, the LM
    head an e4m3 copy of the embeddings (a scale per vocabulary entry), the embeddings themselves unchanged."""
    tensors = model.load_tensors(DECODER_PREFIXES, dtype=dtype, device=device)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith(ADAPTER_PREFIX):
            name = "adapter." + name[len(ADAPTER_PREFIX) :]
        elif name == TOKEN_EMBEDDING:
            name = "tok_embeddings.weight"
        renamed[name] = tensor
    with torch.device("meta"):
        decoder = TextDecoder(model.params)
    decoder.load_state_dict(renamed, assign=True)
    decoder.rope.to(device)  # its table was computed on the CPU, not the meta device
    fuse_projections(decoder)
    if fp8_weights:
        quantize_linears(decoder.layers, FP8_LINEARS)
    if fp8_lm_head:
        decoder.lm_head = Fp8Linear(decoder.tok_embeddings.weight)
    return decoder.eval()
