"""The one place that reads a model directory: params.json (or HF config.json), tekken.json and the weights.

Weights are returned under their Mistral (consolidated.safetensors) names in every case; the Hugging Face
layout is renamed and its q/k rows un-permuted back to the interleaved RoPE order on load.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from voxtral_run.stages.audio.constants import (
    ENCODER_FRAMES_PER_TOKEN,
    FRAME_RATE,
    GLOBAL_LOG_MEL_MAX,
    HOP_LENGTH,
    NUM_MEL_BINS,
    SAMPLE_RATE,
    WINDOW_SIZE,
)
from voxtral_run.stages.base import CheckpointError, read_json_object
from voxtral_run.stages.text.tekken import STREAMING_FORMAT, TEKKEN_FILE, Tekken, load_tekken

PARAMS_FILE = "params.json"
CONSOLIDATED_FILE = "consolidated.safetensors"
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_MODEL_TYPE = "voxtral_realtime"

# Tensor-name prefixes of the Mistral layout; a stage loads only the parts it runs.
EMBEDDING_MODULE = "mm_streams_embeddings.embedding_module."
ENCODER_PREFIX = EMBEDDING_MODULE + "whisper_encoder."
ADAPTER_PREFIX = EMBEDDING_MODULE + "audio_language_projection."
TOKEN_EMBEDDING = EMBEDDING_MODULE + "tok_embeddings.weight"
DECODER_LAYERS_PREFIX = "layers."
DECODER_NORM = "norm.weight"
DECODER_PREFIXES = (ADAPTER_PREFIX, TOKEN_EMBEDDING, DECODER_LAYERS_PREFIX, DECODER_NORM)

ADA_NORM_DIM = 32  # bottleneck of the delay conditioning MLP; the reference hard-codes it

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEADER_LENGTH_BYTES = 8  # a safetensors file opens with its header length, u64 little-endian
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class TransformerParams:
    """Shape and attention settings of one transformer stack (audio encoder or text decoder)."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    rope_theta: float
    norm_eps: float
    sliding_window: int
    use_biases: bool


@dataclass(frozen=True)
class ModelParams:
    """Everything params.json says about the model, validated."""

    decoder: TransformerParams
    encoder: TransformerParams
    vocab_size: int
    downsample_factor: int
    ada_norm_dim: int
    model_max_length: int

    @property
    def adapter_input_dim(self) -> int:
        """Width of one adapter input: `downsample_factor` encoder frames concatenated."""
        return self.encoder.dim * self.downsample_factor


# Dotted keys of params.json (docs/MODEL.md §1): the top level is the text decoder.
ENCODER_ARGS = "multimodal.whisper_model_args.encoder_args"
AUDIO_ENCODING_ARGS = ENCODER_ARGS + ".audio_encoding_args"
DOWNSAMPLE_FACTOR = "multimodal.whisper_model_args.downsample_args.downsample_factor"
DEFAULT_MAX_LENGTH = 131072  # what the HF conversion assumes when params.json gives no length

_REQUIRED = object()
_NUMBER = (int, float)
_JSON_KINDS = {bool: "a boolean", int: "an integer", str: "a string", dict: "an object", _NUMBER: "a number"}


def _get(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path, default: Any = _REQUIRED) -> Any:
    """The value at dotted `key` of a JSON object, of JSON type `kind` (a boolean is never a number)."""
    value: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{path}: key '{'.'.join(parts[:depth])}' must be an object, got {reprlib.repr(value)}"
            )
        if part not in value:
            if default is not _REQUIRED:
                return default
            raise CheckpointError(f"{path}: missing key '{key}'")
        value = value[part]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise CheckpointError(f"{path}: key '{key}' must be {_JSON_KINDS[kind]}, got {reprlib.repr(value)}")
    return value


def _positive(raw: Mapping[str, Any], key: str, path: Path, default: Any = _REQUIRED) -> int | float:
    value = _get(raw, key, _NUMBER, path, default)
    if value <= 0:
        raise CheckpointError(f"{path}: key '{key}' must be positive, got {value!r}")
    return value


def _count(raw: Mapping[str, Any], key: str, path: Path, default: Any = _REQUIRED) -> int:
    """A positive whole number; 8192.0 counts (the HF conversion casts windows to int), 8192.5 does not."""
    value = _positive(raw, key, path, default)
    if isinstance(value, float) and not value.is_integer():
        raise CheckpointError(f"{path}: key '{key}' must be a whole number, got {value!r}")
    return int(value)


def _expect(
    raw: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    expected: Any,
    path: Path,
    why: str,
    *,
    optional: bool = False,
) -> None:
    """A key whose value is fixed for this model (a flag or a front-end constant); `optional`: may be absent."""
    value = _get(raw, key, kind, path, expected if optional else _REQUIRED)
    if value != expected:
        raise CheckpointError(f"{path}: key '{key}' must be {json.dumps(expected)} ({why}), got {json.dumps(value)}")


def _stack_params(
    raw: Mapping[str, Any], keys: Mapping[str, str], path: Path, *, use_biases: bool
) -> TransformerParams:
    """One stack's settings; `keys` maps each TransformerParams field to its dotted key in the file."""
    params = TransformerParams(
        dim=_count(raw, keys["dim"], path),
        n_layers=_count(raw, keys["n_layers"], path),
        head_dim=_count(raw, keys["head_dim"], path),
        hidden_dim=_count(raw, keys["hidden_dim"], path),
        n_heads=_count(raw, keys["n_heads"], path),
        n_kv_heads=_count(raw, keys["n_kv_heads"], path),
        rope_theta=float(_positive(raw, keys["rope_theta"], path)),
        norm_eps=float(_positive(raw, keys["norm_eps"], path)),
        sliding_window=_count(raw, keys["sliding_window"], path),
        use_biases=use_biases,
    )
    if params.n_heads % params.n_kv_heads:
        raise CheckpointError(
            f"{path}: key '{keys['n_heads']}' ({params.n_heads}) must be a multiple of "
            f"'{keys['n_kv_heads']}' ({params.n_kv_heads})"
        )
    if params.head_dim % 2:
        raise CheckpointError(f"{path}: key '{keys['head_dim']}' must be even for RoPE, got {params.head_dim}")
    return params


_STACK_FIELDS = tuple(field.name for field in fields(TransformerParams) if field.name != "use_biases")


def parse_params(path: Path) -> ModelParams:
    """Read and validate params.json (docs/MODEL.md §1); the only reader of that file.

    model_parallel and the encoder's vocab_size, use_cache and max_source_positions play no part in
    inference and are not checked.
    """
    path = Path(path)
    raw = read_json_object(path)
    _expect(raw, "causal", bool, True, path, "the realtime decoder is causal")
    _expect(raw, "use_biases", bool, False, path, "the decoder has no biases")
    _expect(raw, "tied_embeddings", bool, True, path, "the LM head is the token embedding")
    _expect(raw, "ada_rms_norm_t_cond", bool, True, path, "the decoder is delay-conditioned")
    decoder = _stack_params(raw, {name: name for name in _STACK_FIELDS}, path, use_biases=False)

    enc = ENCODER_ARGS + "."
    _expect(raw, enc + "causal", bool, True, path, "the realtime encoder is causal")
    _expect(raw, enc + "use_biases", bool, True, path, "wq, wv, wo and w2 have biases")
    _expect(raw, enc + "pos_embed", str, "rope", path, "the encoder uses RoPE")
    _expect(raw, enc + "ffn_type", str, "swiglu", path, "the encoder FFN is SwiGLU")
    _expect(raw, enc + "norm_type", str, "rms_norm", path, "the encoder uses RMSNorm")
    encoder = _stack_params(raw, {name: enc + name for name in _STACK_FIELDS}, path, use_biases=True)
    if encoder.n_kv_heads != encoder.n_heads:
        raise CheckpointError(
            f"{path}: key '{enc}n_kv_heads' must equal n_heads {encoder.n_heads} (the encoder is multi-head), "
            f"got {encoder.n_kv_heads}"
        )

    audio = AUDIO_ENCODING_ARGS + "."
    for key, expected in (
        ("sampling_rate", SAMPLE_RATE),
        ("frame_rate", FRAME_RATE),
        ("num_mel_bins", NUM_MEL_BINS),
        ("hop_length", HOP_LENGTH),
        ("window_size", WINDOW_SIZE),
        ("global_log_mel_max", GLOBAL_LOG_MEL_MAX),
    ):
        _expect(raw, audio + key, _NUMBER, expected, path, "the front end this engine computes")
    _expect(raw, audio + "transcription_format", str, STREAMING_FORMAT, path, "the realtime model streams")
    chunk_length = _get(raw, AUDIO_ENCODING_ARGS, dict, path).get("chunk_length_s")
    if chunk_length is not None:
        raise CheckpointError(
            f"{path}: key '{audio}chunk_length_s' must be null (the streaming format), got {json.dumps(chunk_length)}"
        )
    _expect(raw, DOWNSAMPLE_FACTOR, int, ENCODER_FRAMES_PER_TOKEN, path, "encoder frames per decoder position")
    max_length = _count(raw, "max_seq_len", path, default=DEFAULT_MAX_LENGTH)
    return ModelParams(
        decoder=decoder,
        encoder=encoder,
        vocab_size=_count(raw, "vocab_size", path),
        downsample_factor=ENCODER_FRAMES_PER_TOKEN,
        ada_norm_dim=_count(raw, "ada_rms_norm_t_cond_dim", path),
        model_max_length=_count(raw, "model_max_length", path, default=max_length),
    )


_HF_STACK_KEYS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "head_dim": "head_dim",
    "hidden_dim": "intermediate_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "rope_theta": "rope_parameters.rope_theta",
    "norm_eps": "rms_norm_eps",
    "sliding_window": "sliding_window",
}


def parse_hf_config(path: Path) -> ModelParams:
    """Read a Hugging Face config.json of the same model into ModelParams (key mapping: docs/MODEL.md §1)."""
    path = Path(path)
    raw = read_json_object(path)
    _expect(raw, "model_type", str, HF_MODEL_TYPE, path, "the Voxtral Realtime architecture")
    # Both keys default to these values in transformers' config class, so a config may leave them out.
    frames_per_position = "encoder frames per decoder position"
    _expect(raw, "downsample_factor", int, ENCODER_FRAMES_PER_TOKEN, path, frames_per_position, optional=True)
    _expect(raw, "tie_word_embeddings", bool, True, path, "the LM head is the token embedding", optional=True)

    def stack_keys(config: str) -> dict[str, str]:
        keys = {name: f"{config}.{hf_key}" for name, hf_key in _HF_STACK_KEYS.items()}
        if _get(raw, f"{config}.rope_parameters", dict, path, default=None) is None:
            keys["rope_theta"] = f"{config}.rope_theta"  # configs written before rope_parameters existed
        return keys

    audio_keys = stack_keys("audio_config")
    audio_keys["n_kv_heads"] = audio_keys["n_heads"]  # the encoder config aliases the two
    return ModelParams(
        decoder=_stack_params(raw, stack_keys("text_config"), path, use_biases=False),
        encoder=_stack_params(raw, audio_keys, path, use_biases=True),
        vocab_size=_count(raw, "text_config.vocab_size", path),
        downsample_factor=ENCODER_FRAMES_PER_TOKEN,
        ada_norm_dim=ADA_NORM_DIM,
        model_max_length=_count(raw, "text_config.max_position_embeddings", path, default=DEFAULT_MAX_LENGTH),
    )


def expected_tensor_shapes(params: ModelParams) -> dict[str, tuple[int, ...]]:
    """Every tensor of consolidated.safetensors with the shape params.json implies (docs/MODEL.md §3)."""
    enc, dec = params.encoder, params.decoder
    shapes: dict[str, tuple[int, ...]] = {
        TOKEN_EMBEDDING: (params.vocab_size, dec.dim),
        ENCODER_PREFIX + "conv_layers.0.conv.weight": (enc.dim, NUM_MEL_BINS, 3),
        ENCODER_PREFIX + "conv_layers.0.conv.bias": (enc.dim,),
        ENCODER_PREFIX + "conv_layers.1.conv.weight": (enc.dim, enc.dim, 3),
        ENCODER_PREFIX + "conv_layers.1.conv.bias": (enc.dim,),
        ENCODER_PREFIX + "transformer.norm.weight": (enc.dim,),
        ADAPTER_PREFIX + "0.weight": (dec.dim, params.adapter_input_dim),
        ADAPTER_PREFIX + "2.weight": (dec.dim, dec.dim),
        DECODER_NORM: (dec.dim,),
    }
    q_dim, kv_dim = enc.n_heads * enc.head_dim, enc.n_kv_heads * enc.head_dim
    for i in range(enc.n_layers):
        layer = f"{ENCODER_PREFIX}transformer.layers.{i}."
        shapes.update(
            {
                layer + "attention.wq.weight": (q_dim, enc.dim),
                layer + "attention.wq.bias": (q_dim,),
                layer + "attention.wk.weight": (kv_dim, enc.dim),
                layer + "attention.wv.weight": (kv_dim, enc.dim),
                layer + "attention.wv.bias": (kv_dim,),
                layer + "attention.wo.weight": (enc.dim, q_dim),
                layer + "attention.wo.bias": (enc.dim,),
                layer + "attention_norm.weight": (enc.dim,),
                layer + "feed_forward.w1.weight": (enc.hidden_dim, enc.dim),
                layer + "feed_forward.w2.weight": (enc.dim, enc.hidden_dim),
                layer + "feed_forward.w2.bias": (enc.dim,),
                layer + "feed_forward.w3.weight": (enc.hidden_dim, enc.dim),
                layer + "ffn_norm.weight": (enc.dim,),
            }
        )
    q_dim, kv_dim = dec.n_heads * dec.head_dim, dec.n_kv_heads * dec.head_dim
    for j in range(dec.n_layers):
        layer = f"{DECODER_LAYERS_PREFIX}{j}."
        shapes.update(
            {
                layer + "attention_norm.weight": (dec.dim,),
                layer + "attention.wq.weight": (q_dim, dec.dim),
                layer + "attention.wk.weight": (kv_dim, dec.dim),
                layer + "attention.wv.weight": (kv_dim, dec.dim),
                layer + "attention.wo.weight": (dec.dim, q_dim),
                layer + "ffn_norm.weight": (dec.dim,),
                layer + "feed_forward.w1.weight": (dec.hidden_dim, dec.dim),
                layer + "feed_forward.w2.weight": (dec.dim, dec.hidden_dim),
                layer + "feed_forward.w3.weight": (dec.hidden_dim, dec.dim),
                layer + "ada_rms_norm_t_cond.0.weight": (params.ada_norm_dim, dec.dim),
                layer + "ada_rms_norm_t_cond.2.weight": (dec.dim, params.ada_norm_dim),
            }
        )
    return shapes


@dataclass(frozen=True)
class _TensorEntry:
    file: Path
    stored_name: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header, after checking the file is complete."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(HEADER_LENGTH_BYTES)
            if len(prefix) < HEADER_LENGTH_BYTES:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            data_len = size - HEADER_LENGTH_BYTES - header_len
            if data_len < 0:
                raise CheckpointError(f"{path}: truncated safetensors file (the header runs past the end)")
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (the header is not a JSON object)")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(offset) for offset in info["data_offsets"])
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if end > data_len:
            raise CheckpointError(f"{path}: truncated safetensors file (tensor '{name}' ends past the end)")
        if dtype in _SAFETENSORS_DTYPES and not 0 <= begin <= end == begin + _nbytes(dtype, shape):
            raise CheckpointError(
                f"{path}: corrupt safetensors file (tensor '{name}' has offsets {begin}..{end}, "
                f"its {dtype} shape {list(shape)} needs {_nbytes(dtype, shape)} bytes)"
            )
        tensors[name] = (dtype, shape)
        data_end = max(data_end, end)
    if data_end < data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file ({data_len - data_end} bytes after the last tensor)")
    return tensors


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize


def _hf_to_mistral_name(hf_name: str) -> str | None:
    """Mistral name of a Hugging Face tensor name (legacy or re-saved), None for the tied LM head."""
    if re.fullmatch(r"(?:language_model\.)?lm_head\.weight", hf_name):
        return None
    name = re.sub(r"^(?:model\.)?", "", hf_name)
    if name.startswith("audio_tower."):
        rest = name[len("audio_tower.") :]
        rest = re.sub(r"^embedder\.conv([12])\.", lambda m: f"conv_layers.{int(m[1]) - 1}.conv.", rest)
        if rest == "norm.weight":
            return ENCODER_PREFIX + "transformer.norm.weight"
        if rest.startswith("layers."):
            rest = "transformer." + _rename_layer(rest, encoder=True)
        return ENCODER_PREFIX + rest
    if name.startswith("multi_modal_projector."):
        rest = name[len("multi_modal_projector.") :]
        return ADAPTER_PREFIX + rest.replace("linear_1.", "0.").replace("linear_2.", "2.")
    if name.startswith("language_model."):
        rest = re.sub(r"^(?:model\.)+", "", name[len("language_model.") :])
        if rest == "embed_tokens.weight":
            return TOKEN_EMBEDDING
        return _rename_layer(rest, encoder=False)
    return hf_name  # unknown: reported as an extra tensor by the caller


_LAYER_RENAMES = (
    ("self_attn.q_proj.", "attention.wq."),
    ("self_attn.k_proj.", "attention.wk."),
    ("self_attn.v_proj.", "attention.wv."),
    ("self_attn.o_proj.", "attention.wo."),
    ("mlp.gate_proj.", "feed_forward.w1."),
    ("mlp.down_proj.", "feed_forward.w2."),
    ("mlp.up_proj.", "feed_forward.w3."),
    ("ada_rms_norm.linear1.", "ada_rms_norm_t_cond.0."),
    ("ada_rms_norm.linear2.", "ada_rms_norm_t_cond.2."),
)


def _rename_layer(name: str, *, encoder: bool) -> str:
    for old, new in _LAYER_RENAMES:
        name = name.replace(old, new)
    norms = (
        (("self_attn_layer_norm.", "attention_norm."), ("final_layer_norm.", "ffn_norm."))
        if encoder
        else (("input_layernorm.", "attention_norm."), ("post_attention_layernorm.", "ffn_norm."))
    )
    for old, new in norms:
        name = name.replace(old, new)
    return name


def unpermute_rope_rows(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face rotate-half row order -> Mistral interleaved order for q/k weights or biases (docs/MODEL.md §3)."""
    head_dim = tensor.shape[0] // n_heads
    rest = tensor.shape[1:]
    return tensor.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(tensor.shape)


class ModelDir:
    """A model directory in the Mistral layout (params.json, consolidated.safetensors, tekken.json) or the
    Hugging Face layout (config.json, model.safetensors or the shards its index lists, tekken.json)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model directory not found")
        if (self.path / PARAMS_FILE).is_file() or (self.path / CONSOLIDATED_FILE).is_file():
            self.layout = "mistral"
            self.params = parse_params(self.path / PARAMS_FILE)
            weight_files = [self.path / CONSOLIDATED_FILE]
            if not weight_files[0].is_file():
                raise CheckpointError(f"{weight_files[0]}: file not found")
        elif (self.path / HF_CONFIG_FILE).is_file():
            self.layout = "hf"
            self.params = parse_hf_config(self.path / HF_CONFIG_FILE)
            weight_files = self._hf_weight_files()
        else:
            raise CheckpointError(f"{self.path}: neither {PARAMS_FILE} nor {HF_CONFIG_FILE} found")
        self.tekken: Tekken = load_tekken(self.path / TEKKEN_FILE)
        if self.tekken.vocab_size != self.params.vocab_size:
            raise CheckpointError(
                f"{self.path / TEKKEN_FILE}: vocabulary size {self.tekken.vocab_size} disagrees with the "
                f"model's vocab_size {self.params.vocab_size}"
            )
        self._index = self._index_tensors(weight_files)

    def _hf_weight_files(self) -> list[Path]:
        index_file = self.path / HF_INDEX_FILE
        if not index_file.is_file():
            single = self.path / HF_WEIGHTS_FILE
            if not single.is_file():
                raise CheckpointError(f"{single}: file not found (nor {HF_INDEX_FILE})")
            return [single]
        weight_map = _get(read_json_object(index_file), "weight_map", dict, index_file)
        files = sorted({self.path / str(shard) for shard in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: file not found (listed in {index_file.name})")
        return files

    def _index_tensors(self, files: list[Path]) -> dict[str, _TensorEntry]:
        expected = expected_tensor_shapes(self.params)
        index: dict[str, _TensorEntry] = {}
        for file in files:
            for stored, (dtype, shape) in read_safetensors_header(file).items():
                name = stored if self.layout == "mistral" else _hf_to_mistral_name(stored)
                if name is None:
                    continue
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor '{stored}'")
                if dtype not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: tensor '{stored}' has unsupported dtype {dtype}")
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{file}: tensor '{stored}' has shape {list(shape)}, params imply {list(expected[name])}"
                    )
                if name in index:
                    raise CheckpointError(
                        f"{file}: tensor '{stored}' is also stored as '{index[name].stored_name}' "
                        f"in {index[name].file.name}"
                    )
                index[name] = _TensorEntry(file, stored, shape)
        missing = [name for name in expected if name not in index]
        if missing:
            where = files[0] if len(files) == 1 else self.path
            mistral_name = " (Mistral name)" if self.layout == "hf" else ""
            raise CheckpointError(
                f"{where}: missing tensor '{missing[0]}'{mistral_name} ({len(missing)} missing in all)"
            )
        return index

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's Mistral name and shape (from the file headers; nothing is loaded)."""
        return {name: entry.shape for name, entry in self._index.items()}

    def load_tensors(
        self, prefixes: Iterable[str], *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Load only the tensors whose Mistral name starts with one of `prefixes`, memory-mapped, converted."""
        prefixes = tuple(prefixes)
        wanted = [name for name in self._index if name.startswith(prefixes)]
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self._index[name].file, []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name in names:
                        tensor = handle.get_tensor(self._index[name].stored_name)
                        # Always a fresh copy: a tensor left in the mapped file sits at whatever offset the
                        # header gives it, and CPU matrix kernels round differently on unaligned memory, so the
                        # same weights in another file layout would give other logits in the last bits.
                        tensor = self._to_mistral_order(name, tensor)
                        tensors[name] = tensor.to(device=device, dtype=dtype, copy=True)
            except (OSError, RuntimeError, ValueError, SafetensorError) as err:
                raise CheckpointError(f"{file}: cannot read tensors ({str(err).splitlines()[0]})") from None
        return tensors

    def _to_mistral_order(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.layout != "hf" or not re.search(r"attention\.w[qk]\.", name):
            return tensor
        stack = self.params.encoder if name.startswith(ENCODER_PREFIX) else self.params.decoder
        heads = stack.n_heads if ".wq." in name else stack.n_kv_heads
        return unpermute_rope_rows(tensor, heads)


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype for a config name (float32, bfloat16, float16)."""
    if name not in _DTYPES:
        raise CheckpointError(f"unknown dtype '{name}' (choose from {', '.join(_DTYPES)})")
    return _DTYPES[name]
