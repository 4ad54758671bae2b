"""The one place that reads a model directory: params.json (or HF config.json), tekken.json and the weights.

Weights are returned under their Mistral (consolidated.safetensors) names in every case; the Hugging Face
layout is renamed and its q/k rows un-permuted back to the interleaved RoPE order on load.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from stages.audio import ENCODER_FRAMES_PER_TOKEN, FRAME_RATE, HOP_LENGTH, NUM_MEL_BINS, SAMPLE_RATE, WINDOW_SIZE
from stages.base import CheckpointError
from stages.tekken import Tekken, load_tekken

PARAMS_FILE = "params.json"
TEKKEN_FILE = "tekken.json"
CONSOLIDATED_FILE = "consolidated.safetensors"
HF_CONFIG_FILE = "config.json"

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


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise CheckpointError(f"{where}: missing key '{key}'")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{where}: key '{key}' must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise CheckpointError(f"{where}: key '{key}' must be {_kind_name(kind)}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise CheckpointError(f"{where}: key '{key}' must be positive, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _stack_params(obj: Mapping[str, Any], where: str, *, use_biases: bool) -> TransformerParams:
    number = (int, float)
    params = TransformerParams(
        dim=_field(obj, "dim", int, where),
        n_layers=_field(obj, "n_layers", int, where),
        head_dim=_field(obj, "head_dim", int, where),
        hidden_dim=_field(obj, "hidden_dim", int, where),
        n_heads=_field(obj, "n_heads", int, where),
        n_kv_heads=_field(obj, "n_kv_heads", int, where),
        rope_theta=float(_field(obj, "rope_theta", number, where)),
        norm_eps=float(_field(obj, "norm_eps", number, where)),
        sliding_window=int(_field(obj, "sliding_window", number, where)),
        use_biases=use_biases,
    )
    if params.n_heads % params.n_kv_heads:
        raise CheckpointError(f"{where}: n_heads {params.n_heads} is not a multiple of n_kv_heads {params.n_kv_heads}")
    if params.head_dim % 2:
        raise CheckpointError(f"{where}: head_dim {params.head_dim} must be even for RoPE")
    return params


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def parse_params(path: Path) -> ModelParams:
    """Read and validate params.json (spec section 2.1); the only reader of that file."""
    raw = _read_json(path)
    where = str(path)
    if not _field(raw, "causal", bool, where):
        raise CheckpointError(f"{where}: key 'causal' must be true for the realtime model")
    if _field(raw, "use_biases", bool, where):
        raise CheckpointError(f"{where}: key 'use_biases' must be false (the decoder has no biases)")
    if not _field(raw, "tied_embeddings", bool, where):
        raise CheckpointError(f"{where}: key 'tied_embeddings' must be true (the LM head is the embedding)")
    if not _field(raw, "ada_rms_norm_t_cond", bool, where):
        raise CheckpointError(f"{where}: key 'ada_rms_norm_t_cond' must be true (delay conditioning)")
    ada_dim = _field(raw, "ada_rms_norm_t_cond_dim", int, where)
    decoder = _stack_params(raw, where, use_biases=False)
    vocab_size = _field(raw, "vocab_size", int, where)
    max_length = int(raw.get("model_max_length", raw.get("max_seq_len", 131072)))

    multimodal = _field(raw, "multimodal", dict, where)
    whisper = _field(multimodal, "whisper_model_args", dict, where + " multimodal")
    enc_where = where + " multimodal.whisper_model_args.encoder_args"
    enc = _field(whisper, "encoder_args", dict, where + " multimodal.whisper_model_args")
    if not _field(enc, "causal", bool, enc_where):
        raise CheckpointError(f"{enc_where}: key 'causal' must be true for the realtime encoder")
    if _field(enc, "pos_embed", str, enc_where) != "rope":
        raise CheckpointError(f"{enc_where}: key 'pos_embed' must be 'rope', got {enc['pos_embed']!r}")
    for key, expected in (("ffn_type", "swiglu"), ("norm_type", "rms_norm")):
        if enc.get(key, expected) != expected:
            raise CheckpointError(f"{enc_where}: key '{key}' must be '{expected}', got {enc[key]!r}")
    encoder = _stack_params(enc, enc_where, use_biases=_field(enc, "use_biases", bool, enc_where))
    if not encoder.use_biases:
        raise CheckpointError(f"{enc_where}: key 'use_biases' must be true (wq, wv, wo and w2 have biases)")
    if encoder.n_kv_heads != encoder.n_heads:
        raise CheckpointError(f"{enc_where}: n_kv_heads must equal n_heads (the encoder is multi-head)")

    audio_where = enc_where + ".audio_encoding_args"
    audio = _field(enc, "audio_encoding_args", dict, enc_where)
    for key, expected in (
        ("sampling_rate", SAMPLE_RATE),
        ("frame_rate", FRAME_RATE),
        ("num_mel_bins", NUM_MEL_BINS),
        ("hop_length", HOP_LENGTH),
        ("window_size", WINDOW_SIZE),
    ):
        if _field(audio, key, (int, float), audio_where) != expected:
            raise CheckpointError(f"{audio_where}: key '{key}' is {audio[key]!r}, this engine supports {expected}")
    downsample = _field(_field(whisper, "downsample_args", dict, where), "downsample_factor", int, where)
    if downsample != ENCODER_FRAMES_PER_TOKEN:
        raise CheckpointError(
            f"{where}: downsample_factor is {downsample}, the audio frame rate needs {ENCODER_FRAMES_PER_TOKEN}"
        )
    return ModelParams(
        decoder=decoder,
        encoder=encoder,
        vocab_size=vocab_size,
        downsample_factor=downsample,
        ada_norm_dim=ada_dim,
        model_max_length=max_length,
    )


def parse_hf_config(path: Path) -> ModelParams:
    """Read a Hugging Face config.json of the same model into ModelParams (spec section 2.3 mapping)."""
    raw = _read_json(path)
    where = str(path)
    if raw.get("model_type") != "voxtral_realtime":
        raise CheckpointError(f"{where}: key 'model_type' must be 'voxtral_realtime', got {raw.get('model_type')!r}")

    def stack(cfg: Mapping[str, Any], cfg_where: str, *, use_biases: bool, default_kv: bool) -> TransformerParams:
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is None:
            raise CheckpointError(f"{cfg_where}: missing key 'rope_parameters.rope_theta'")
        kv = cfg.get("num_key_value_heads") if not default_kv else cfg.get("num_attention_heads")
        mapped = {
            "dim": cfg.get("hidden_size"),
            "n_layers": cfg.get("num_hidden_layers"),
            "head_dim": cfg.get("head_dim"),
            "hidden_dim": cfg.get("intermediate_size"),
            "n_heads": cfg.get("num_attention_heads"),
            "n_kv_heads": kv,
            "rope_theta": theta,
            "norm_eps": cfg.get("rms_norm_eps"),
            "sliding_window": cfg.get("sliding_window"),
        }
        missing = [k for k, v in mapped.items() if v is None]
        if missing:
            raise CheckpointError(f"{cfg_where}: missing value for '{missing[0]}'")
        return _stack_params(mapped, cfg_where, use_biases=use_biases)

    text = _field(raw, "text_config", dict, where)
    audio = _field(raw, "audio_config", dict, where)
    downsample = int(raw.get("downsample_factor", ENCODER_FRAMES_PER_TOKEN))
    if downsample != ENCODER_FRAMES_PER_TOKEN:
        raise CheckpointError(f"{where}: downsample_factor is {downsample}, expected {ENCODER_FRAMES_PER_TOKEN}")
    return ModelParams(
        decoder=stack(text, where + " text_config", use_biases=False, default_kv=False),
        encoder=stack(audio, where + " audio_config", use_biases=True, default_kv=True),
        vocab_size=_field(text, "vocab_size", int, where + " text_config"),
        downsample_factor=downsample,
        ada_norm_dim=ADA_NORM_DIM,
        model_max_length=int(text.get("max_position_embeddings", 131072)),
    )


def expected_tensor_shapes(params: ModelParams) -> dict[str, tuple[int, ...]]:
    """Every tensor of consolidated.safetensors with the shape params.json implies (spec section 3.1)."""
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
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header runs past the end)")
            header = json.loads(handle.read(header_len))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    data_len = size - 8 - header_len
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if end > data_len:
            raise CheckpointError(f"{path}: truncated safetensors file (tensor '{name}' ends past the end of the file)")
        tensors[name] = (dtype, shape)
    return tensors


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
    """Hugging Face rotate-half row order -> Mistral interleaved order for q/k weights or biases."""
    head_dim = tensor.shape[0] // n_heads
    rest = tensor.shape[1:]
    return tensor.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(tensor.shape)


class ModelDir:
    """A model directory in the Mistral layout (params.json, consolidated.safetensors, tekken.json)
    or the Hugging Face layout (config.json, model*.safetensors, tekken.json)."""

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
            weight_files = sorted(self.path.glob("model*.safetensors"))
            if not weight_files:
                raise CheckpointError(f"{self.path}: no model*.safetensors next to config.json")
        else:
            raise CheckpointError(f"{self.path}: neither {PARAMS_FILE} nor {HF_CONFIG_FILE} found")
        self.tekken: Tekken = load_tekken(self.path / TEKKEN_FILE)
        if self.tekken.vocab_size != self.params.vocab_size:
            raise CheckpointError(
                f"{self.path / TEKKEN_FILE}: vocabulary size {self.tekken.vocab_size} disagrees with the "
                f"model's vocab_size {self.params.vocab_size}"
            )
        self._index = self._index_tensors(weight_files)

    def _index_tensors(self, files: Iterable[Path]) -> dict[str, _TensorEntry]:
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
                index[name] = _TensorEntry(file, stored, shape)
        missing = [name for name in expected if name not in index]
        if missing:
            where = files if self.layout == "hf" else [self.path / CONSOLIDATED_FILE]
            raise CheckpointError(f"{where[0]}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
        return index

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
                        tensors[name] = self._to_mistral_order(name, tensor).to(device=device, dtype=dtype)
            except (OSError, RuntimeError, ValueError) as err:
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
