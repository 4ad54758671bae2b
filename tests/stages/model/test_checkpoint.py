"""Checkpoint loading: the Mistral layout by prefix and dtype, the Hugging Face layout of the same model, the
published model's shapes, and a one-line CheckpointError naming the file and key for every broken directory."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import speechlike_audio
from voxtral_run.stages.audio.constants import pad_audio
from voxtral_run.stages.audio.mel import log_mel_frames
from voxtral_run.stages.base import CheckpointError
from voxtral_run.stages.model import checkpoint
from voxtral_run.stages.model.checkpoint import (
    ADAPTER_PREFIX,
    AUDIO_ENCODING_ARGS,
    CONSOLIDATED_FILE,
    DECODER_NORM,
    DECODER_PREFIXES,
    DOWNSAMPLE_FACTOR,
    ENCODER_ARGS,
    ENCODER_PREFIX,
    HF_CONFIG_FILE,
    HF_INDEX_FILE,
    HF_WEIGHTS_FILE,
    PARAMS_FILE,
    TEKKEN_FILE,
    TOKEN_EMBEDDING,
    ModelDir,
    expected_tensor_shapes,
    parse_params,
    read_safetensors_header,
    torch_dtype,
    unpermute_rope_rows,
)
from voxtral_run.stages.model.decoder import load_text_decoder
from voxtral_run.stages.model.encoder import load_audio_encoder
from voxtral_run.tools.make_tiny_checkpoint import REAL_SIZE, TINY, params_json, write_tiny_checkpoint

# The published model (docs/MODEL.md §3): tensor count and parameter counts per part.
REAL_TENSOR_COUNT = 711
REAL_PARAMETERS = 4_429_679_360
REAL_ENCODER_PARAMETERS = 970_395_392
REAL_ADAPTER_PARAMETERS = 25_165_824
REAL_DECODER_PARAMETERS = 3_434_118_144  # embeddings included

DELETE = object()  # marks a key to remove in the parametrized edits


def expected_names(model_dir: Path, prefixes: tuple[str, ...]) -> set[str]:
    return {name for name in expected_tensor_shapes(parse_params(model_dir / PARAMS_FILE)) if name.startswith(prefixes)}


def edit_json(path: Path, key: str, value: Any) -> None:
    """Set (or with DELETE remove) the dotted `key` of a JSON file."""
    data = json.loads(path.read_text())
    *parents, last = key.split(".")
    target = data
    for part in parents:
        target = target[part]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def checkpoint_error(model_dir: Path) -> str:
    """The message ModelDir raises for a broken directory; it must be one line."""
    with pytest.raises(CheckpointError) as info:
        ModelDir(model_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Mistral-layout model to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def hf_dir(tiny_model_dir: Path, hf_oracle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model saved by transformers (config.json, model.safetensors) plus its tekken.json."""
    out = tmp_path_factory.mktemp("hf")
    hf_oracle(tiny_model_dir).save_pretrained(out)
    shutil.copy(tiny_model_dir / TEKKEN_FILE, out)
    return out


@pytest.fixture
def tensor_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the tensors ModelDir reads from safetensors files, in order."""
    reads: list[str] = []
    real_safe_open = checkpoint.safe_open

    class RecordingOpen:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._file = real_safe_open(*args, **kwargs)

        def __enter__(self) -> RecordingOpen:
            self._handle = self._file.__enter__()
            return self

        def __exit__(self, *exc_info: Any) -> None:
            self._file.__exit__(*exc_info)

        def get_tensor(self, name: str) -> torch.Tensor:
            reads.append(name)
            return self._handle.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", RecordingOpen)
    return reads


# --- Mistral layout ---


def test_params_json_gives_the_written_shapes(tiny_model_dir: Path) -> None:
    params = ModelDir(tiny_model_dir).params
    dec, enc = params.decoder, params.encoder
    assert (dec.dim, dec.n_layers, dec.head_dim, dec.hidden_dim) == (
        TINY.dec_dim,
        TINY.dec_layers,
        TINY.dec_head_dim,
        TINY.dec_hidden_dim,
    )
    assert (dec.n_heads, dec.n_kv_heads, dec.sliding_window, dec.use_biases) == (
        TINY.dec_heads,
        TINY.dec_kv_heads,
        TINY.dec_window,
        False,
    )
    assert (enc.dim, enc.n_layers, enc.head_dim, enc.hidden_dim) == (
        TINY.enc_dim,
        TINY.enc_layers,
        TINY.enc_head_dim,
        TINY.enc_hidden_dim,
    )
    assert (enc.n_heads, enc.n_kv_heads, enc.sliding_window, enc.use_biases) == (
        TINY.enc_heads,
        TINY.enc_heads,
        TINY.enc_window,
        True,
    )
    written = params_json(TINY)
    assert (params.vocab_size, params.ada_norm_dim) == (written["vocab_size"], written["ada_rms_norm_t_cond_dim"])
    assert params.model_max_length == written["model_max_length"]
    assert params.adapter_input_dim == TINY.enc_dim * params.downsample_factor


def test_encoder_and_decoder_prefixes_split_the_checkpoint(tiny_model_dir: Path) -> None:
    everything = set(load_file(str(tiny_model_dir / CONSOLIDATED_FILE)))
    encoder = expected_names(tiny_model_dir, (ENCODER_PREFIX,))
    decoder = expected_names(tiny_model_dir, DECODER_PREFIXES)
    assert encoder and decoder and not encoder & decoder
    assert encoder | decoder == everything
    assert TOKEN_EMBEDDING in decoder and any(name.startswith(ADAPTER_PREFIX) for name in decoder)


@pytest.mark.parametrize("prefixes", [(ENCODER_PREFIX,), DECODER_PREFIXES], ids=["encoder", "decoder"])
def test_load_tensors_reads_only_the_prefixes_asked_for(
    tiny_model_dir: Path, tensor_reads: list[str], prefixes: tuple[str, ...]
) -> None:
    model = ModelDir(tiny_model_dir)
    assert tensor_reads == []  # opening the directory reads headers only
    tensors = model.load_tensors(prefixes)
    wanted = expected_names(tiny_model_dir, prefixes)
    assert set(tensors) == wanted
    assert sorted(tensor_reads) == sorted(wanted)
    stored = load_file(str(tiny_model_dir / CONSOLIDATED_FILE))
    for name, tensor in tensors.items():
        assert torch.equal(tensor, stored[name]), name


def test_stage_loaders_read_only_their_own_tensors(tiny_model_dir: Path, tensor_reads: list[str]) -> None:
    model = ModelDir(tiny_model_dir)
    load_audio_encoder(model, dtype=torch.float32, device="cpu")
    assert set(tensor_reads) == expected_names(tiny_model_dir, (ENCODER_PREFIX,))
    tensor_reads.clear()
    load_text_decoder(model, dtype=torch.float32, device="cpu")
    assert set(tensor_reads) == expected_names(tiny_model_dir, DECODER_PREFIXES)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("requested", ["float32", "bfloat16"])
def test_load_tensors_converts_to_the_requested_dtype_and_device(tmp_path: Path, stored: str, requested: str) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / "model", dtype=stored)
    raw = load_file(str(model_dir / CONSOLIDATED_FILE))
    assert {tensor.dtype for tensor in raw.values()} == {torch_dtype(stored)}
    target = torch_dtype(requested)
    tensors = ModelDir(model_dir).load_tensors([ENCODER_PREFIX, *DECODER_PREFIXES], dtype=target, device="cpu")
    assert set(tensors) == set(raw)
    for name, tensor in tensors.items():
        assert tensor.dtype == target and tensor.device.type == "cpu", name
        assert torch.equal(tensor, raw[name].to(target)), name


def test_unknown_dtype_name_is_a_checkpoint_error() -> None:
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(CheckpointError, match="float64"):
        torch_dtype("float64")


# --- Hugging Face layout ---


@pytest.mark.parametrize(("heads", "head_dim", "columns"), [(4, 16, 8), (2, 6, 3), (3, 4, None)])
def test_unpermute_rope_rows_follows_the_spec_row_form(heads: int, head_dim: int, columns: int | None) -> None:
    shape = (heads * head_dim,) if columns is None else (heads * head_dim, columns)
    mistral = torch.randn(shape, generator=torch.Generator().manual_seed(heads))
    hf = torch.empty_like(mistral)
    half = head_dim // 2
    # docs/MODEL.md §3: HF row h*d + i = Mistral row h*d + 2i, HF row h*d + d/2 + i = row h*d + 2i + 1
    for h in range(heads):
        for i in range(half):
            hf[h * head_dim + i] = mistral[h * head_dim + 2 * i]
            hf[h * head_dim + half + i] = mistral[h * head_dim + 2 * i + 1]
    assert torch.equal(unpermute_rope_rows(hf, heads), mistral)


def test_hf_layout_loads_the_same_tensors(tiny_model_dir: Path, hf_dir: Path) -> None:
    assert (hf_dir / HF_CONFIG_FILE).is_file() and (hf_dir / HF_WEIGHTS_FILE).is_file()
    mistral, hf = ModelDir(tiny_model_dir), ModelDir(hf_dir)
    assert (mistral.layout, hf.layout) == ("mistral", "hf")
    assert hf.params == mistral.params
    prefixes = [ENCODER_PREFIX, *DECODER_PREFIXES]
    expected, loaded = mistral.load_tensors(prefixes), hf.load_tensors(prefixes)
    assert set(loaded) == set(expected)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, expected[name]), name
    # The HF file really holds the q/k rows in the other order, so the equality above needed the un-permutation.
    stored = load_file(str(hf_dir / HF_WEIGHTS_FILE))
    for hf_name, name in (
        ("audio_tower.layers.0.self_attn.q_proj.bias", ENCODER_PREFIX + "transformer.layers.0.attention.wq.bias"),
        ("language_model.model.model.layers.1.self_attn.k_proj.weight", "layers.1.attention.wk.weight"),
    ):
        assert not torch.equal(stored[hf_name], expected[name])


def test_hf_layout_gives_identical_encoder_frames_and_logits(tiny_model_dir: Path, hf_dir: Path) -> None:
    audio = speechlike_audio(1.0)
    tekken = ModelDir(tiny_model_dir).tekken
    mel = torch.from_numpy(log_mel_frames(pad_audio(audio, 0, tekken.audio.num_delay_tokens)))
    token_ids = torch.randint(tekken.vocab_size, (mel.shape[0] // 8,), generator=torch.Generator().manual_seed(0))
    logits = []
    for model_dir in (tiny_model_dir, hf_dir):
        model = ModelDir(model_dir)
        encoder = load_audio_encoder(model, dtype=torch.float32, device="cpu")
        decoder = load_text_decoder(model, dtype=torch.float32, device="cpu")
        frames = encoder(mel[None], encoder.new_state())
        cache = decoder.new_cache(block=len(token_ids))
        cache.prepare(len(token_ids))
        with torch.inference_mode():
            audio_vectors = decoder.adapt(frames[:, : 4 * len(token_ids)])
            positions = torch.arange(len(token_ids))[None]
            scales = decoder.ffn_scales(tekken.audio.num_delay_tokens)
            hidden = decoder(audio_vectors, token_ids[None], positions, cache, scales)
            logits.append(decoder.logits(hidden)[0])
    assert logits[0].shape == (len(token_ids), tekken.vocab_size)
    assert len(set(logits[0].argmax(-1).tolist())) > 1  # the positions differ, so the comparison covers them
    assert torch.equal(logits[0], logits[1])


def test_sharded_hf_save_loads_the_same_tensors(tiny_model_dir: Path, hf_oracle, tmp_path: Path) -> None:
    hf_oracle(tiny_model_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    shutil.copy(tiny_model_dir / TEKKEN_FILE, tmp_path)
    assert (tmp_path / HF_INDEX_FILE).is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 2
    prefixes = [ENCODER_PREFIX, *DECODER_PREFIXES]
    expected, loaded = ModelDir(tiny_model_dir).load_tensors(prefixes), ModelDir(tmp_path).load_tensors(prefixes)
    assert set(loaded) == set(expected)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, expected[name]), name


def test_hf_shard_missing_from_a_sharded_save(tiny_model_dir: Path, hf_oracle, tmp_path: Path) -> None:
    hf_oracle(tiny_model_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    shutil.copy(tiny_model_dir / TEKKEN_FILE, tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    message = checkpoint_error(tmp_path)
    assert str(shard) in message and "not found" in message


def test_hf_tensor_stored_twice(hf_dir: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(hf_dir, tmp_path / "hf"))

    def add_in_memory_name(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.language_model.norm.weight"] = tensors["language_model.model.model.norm.weight"].clone()

    edit_tensors(model_dir / HF_WEIGHTS_FILE, add_in_memory_name)
    message = checkpoint_error(model_dir)
    assert str(model_dir / HF_WEIGHTS_FILE) in message and "norm.weight" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model_type", "llama"),
        ("downsample_factor", 2),
        ("tie_word_embeddings", False),
        ("text_config.hidden_size", DELETE),
        ("text_config.num_key_value_heads", 3),
        ("text_config.vocab_size", "many"),
        ("audio_config.rope_parameters.rope_theta", DELETE),
        ("audio_config.sliding_window", 0),
        ("audio_config", None),
    ],
)
def test_hf_config_field_errors_name_the_file_and_key(hf_dir: Path, tmp_path: Path, key: str, value: Any) -> None:
    model_dir = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    edit_json(model_dir / HF_CONFIG_FILE, key, value)
    message = checkpoint_error(model_dir)
    assert str(model_dir / HF_CONFIG_FILE) in message and f"'{key}" in message


@pytest.mark.parametrize("key", ["downsample_factor", "tie_word_embeddings"])
def test_hf_config_keys_that_transformers_defaults_may_be_absent(hf_dir: Path, tmp_path: Path, key: str) -> None:
    model_dir = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    edit_json(model_dir / HF_CONFIG_FILE, key, DELETE)
    assert ModelDir(model_dir).params == ModelDir(hf_dir).params


def test_hf_directory_without_weights(hf_dir: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    (model_dir / HF_WEIGHTS_FILE).unlink()
    message = checkpoint_error(model_dir)
    assert str(model_dir / HF_WEIGHTS_FILE) in message and HF_INDEX_FILE in message


# --- the published model's shapes ---


def test_real_size_params_imply_the_published_tensor_and_parameter_counts(tmp_path: Path) -> None:
    path = tmp_path / PARAMS_FILE
    path.write_text(json.dumps(params_json(REAL_SIZE)))
    shapes = expected_tensor_shapes(parse_params(path))
    assert len(shapes) == REAL_TENSOR_COUNT

    def parameters(prefixes: tuple[str, ...]) -> int:
        return sum(math.prod(shape) for name, shape in shapes.items() if name.startswith(prefixes))

    assert parameters(("",)) == REAL_PARAMETERS
    assert parameters((ENCODER_PREFIX,)) == REAL_ENCODER_PARAMETERS
    assert parameters((ADAPTER_PREFIX,)) == REAL_ADAPTER_PARAMETERS
    decoder_only = tuple(prefix for prefix in DECODER_PREFIXES if prefix != ADAPTER_PREFIX)
    assert parameters(decoder_only) == REAL_DECODER_PARAMETERS


# --- broken Mistral-layout directories ---


def test_missing_directory(tmp_path: Path) -> None:
    message = checkpoint_error(tmp_path / "absent")
    assert str(tmp_path / "absent") in message and "not found" in message


def test_directory_with_neither_config(tmp_path: Path) -> None:
    message = checkpoint_error(tmp_path)
    assert str(tmp_path) in message and PARAMS_FILE in message and HF_CONFIG_FILE in message


@pytest.mark.parametrize("missing", [PARAMS_FILE, TEKKEN_FILE, CONSOLIDATED_FILE])
def test_missing_file(model_copy: Path, missing: str) -> None:
    (model_copy / missing).unlink()
    message = checkpoint_error(model_copy)
    assert str(model_copy / missing) in message and "not found" in message


@pytest.mark.parametrize(
    "name", ["layers.1.attention.wk.weight", ENCODER_PREFIX + "transformer.layers.0.attention.wq.bias", TOKEN_EMBEDDING]
)
def test_missing_tensor(model_copy: Path, name: str) -> None:
    edit_tensors(model_copy / CONSOLIDATED_FILE, lambda tensors: tensors.pop(name))
    message = checkpoint_error(model_copy)
    assert str(model_copy / CONSOLIDATED_FILE) in message and f"missing tensor '{name}'" in message


@pytest.mark.parametrize("name", ["output.weight", ENCODER_PREFIX + "transformer.layers.0.attention.wk.bias"])
def test_extra_tensor(model_copy: Path, name: str) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = torch.zeros(3)

    edit_tensors(model_copy / CONSOLIDATED_FILE, add)
    message = checkpoint_error(model_copy)
    assert str(model_copy / CONSOLIDATED_FILE) in message and f"'{name}'" in message


def test_tensor_with_the_wrong_shape(model_copy: Path) -> None:
    name = "layers.0.feed_forward.w2.weight"

    def transpose(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name].T.contiguous()

    edit_tensors(model_copy / CONSOLIDATED_FILE, transpose)
    message = checkpoint_error(model_copy)
    assert str(model_copy / CONSOLIDATED_FILE) in message and f"'{name}'" in message
    assert str([TINY.dec_hidden_dim, TINY.dec_dim]) in message and str([TINY.dec_dim, TINY.dec_hidden_dim]) in message


def test_params_that_disagree_with_the_tensors(model_copy: Path) -> None:
    edit_json(model_copy / PARAMS_FILE, "hidden_dim", TINY.dec_hidden_dim + 32)
    message = checkpoint_error(model_copy)
    assert str(model_copy / CONSOLIDATED_FILE) in message and ".feed_forward.w" in message
    assert str(TINY.dec_hidden_dim + 32) in message


def test_tensor_of_an_unsupported_dtype(model_copy: Path) -> None:
    def to_float64(tensors: dict[str, torch.Tensor]) -> None:
        tensors[DECODER_NORM] = tensors[DECODER_NORM].double()

    edit_tensors(model_copy / CONSOLIDATED_FILE, to_float64)
    message = checkpoint_error(model_copy)
    assert str(model_copy / CONSOLIDATED_FILE) in message and f"'{DECODER_NORM}'" in message
    assert "F64" in message


def test_tekken_vocabulary_that_disagrees_with_params(model_copy: Path) -> None:
    edit_json(model_copy / PARAMS_FILE, "vocab_size", params_json(TINY)["vocab_size"] + 1)
    message = checkpoint_error(model_copy)
    assert str(model_copy / TEKKEN_FILE) in message and "vocab" in message


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda header_len, size: 0, id="empty"),
        pytest.param(lambda header_len, size: 5, id="inside-header-length"),
        pytest.param(lambda header_len, size: 8 + header_len // 2, id="inside-header"),
        pytest.param(lambda header_len, size: 8 + header_len, id="after-header"),
        pytest.param(lambda header_len, size: (8 + header_len + size) // 2, id="inside-data"),
        pytest.param(lambda header_len, size: size - 1, id="last-byte"),
    ],
)
def test_truncated_safetensors(model_copy: Path, cut: Callable[[int, int], int]) -> None:
    path = model_copy / CONSOLIDATED_FILE
    content = path.read_bytes()
    header_len = int.from_bytes(content[:8], "little")
    path.write_bytes(content[: cut(header_len, len(content))])
    message = checkpoint_error(model_copy)
    assert str(path) in message and "truncated" in message


def test_corrupt_safetensors(model_copy: Path) -> None:
    path = model_copy / CONSOLIDATED_FILE
    content = bytearray(path.read_bytes())
    content[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(content))
    message = checkpoint_error(model_copy)
    assert str(path) in message and "header" in message


def test_safetensors_with_bytes_after_the_last_tensor(model_copy: Path) -> None:
    path = model_copy / CONSOLIDATED_FILE
    path.write_bytes(path.read_bytes() + bytes(16))
    message = checkpoint_error(model_copy)
    assert str(path) in message and "16 bytes" in message


def test_weights_replaced_after_opening_give_a_checkpoint_error(model_copy: Path) -> None:
    model = ModelDir(model_copy)
    path = model_copy / CONSOLIDATED_FILE
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError) as info:
        model.load_tensors([ENCODER_PREFIX])
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_safetensors_header_entry_whose_offsets_disagree_with_its_shape(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(CheckpointError, match="'a'.*needs 16 bytes"):
        read_safetensors_header(path)


E = ENCODER_ARGS + "."
A = AUDIO_ENCODING_ARGS + "."


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dim", DELETE),
        ("n_layers", "2"),
        ("head_dim", 15),
        ("hidden_dim", 0),
        ("n_heads", 4.5),
        ("n_kv_heads", 3),
        ("use_biases", True),
        ("causal", False),
        ("rope_theta", "1e6"),
        ("norm_eps", -1e-5),
        ("vocab_size", True),
        ("tied_embeddings", DELETE),
        ("sliding_window", 8192.5),
        ("model_max_length", "long"),
        ("ada_rms_norm_t_cond", False),
        ("ada_rms_norm_t_cond_dim", DELETE),
        ("multimodal", []),
        (ENCODER_ARGS, DELETE),
        (E + "dim", DELETE),
        (E + "n_layers", -1),
        (E + "n_kv_heads", 2),
        (E + "head_dim", None),
        (E + "use_biases", False),
        (E + "causal", False),
        (E + "pos_embed", "sinusoidal"),
        (E + "ffn_type", "gelu"),
        (E + "norm_type", DELETE),
        (E + "rope_theta", DELETE),
        (E + "norm_eps", "small"),
        (E + "sliding_window", 0),
        (A + "sampling_rate", 24000),
        (A + "frame_rate", 25),
        (A + "num_mel_bins", DELETE),
        (A + "hop_length", "160"),
        (A + "window_size", 512),
        (A + "global_log_mel_max", 2.0),
        (A + "transcription_format", "offline"),
        (A + "chunk_length_s", 30),
        (DOWNSAMPLE_FACTOR, 2),
        ("multimodal.whisper_model_args.downsample_args", DELETE),
    ],
)
def test_params_field_errors_name_the_file_and_key(model_copy: Path, key: str, value: Any) -> None:
    edit_json(model_copy / PARAMS_FILE, key, value)
    message = checkpoint_error(model_copy)
    assert str(model_copy / PARAMS_FILE) in message and f"'{key}" in message


def test_whole_float_window_counts_as_an_integer(tiny_model_dir: Path, model_copy: Path) -> None:
    edit_json(model_copy / PARAMS_FILE, "sliding_window", float(TINY.dec_window))
    assert ModelDir(model_copy).params == ModelDir(tiny_model_dir).params


@pytest.mark.parametrize("key", ["model_parallel", E + "vocab_size", E + "use_cache", E + "max_source_positions"])
def test_params_fields_unused_by_inference_may_be_absent(tiny_model_dir: Path, model_copy: Path, key: str) -> None:
    edit_json(model_copy / PARAMS_FILE, key, DELETE)
    assert ModelDir(model_copy).params == ModelDir(tiny_model_dir).params
