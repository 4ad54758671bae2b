"""transformers' VoxtralRealtimeForConditionalGeneration holding the weights of a Mistral-layout model directory.

The correctness oracle for tests (fp32, CPU) and for the GPU benchmark (bf16). Its Mistral -> Hugging Face
mapping is written from docs/MODEL.md §3 independently of the loader in stages/model/checkpoint.py, so the
two check each other.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "ada_rms_norm_t_cond.0": "ada_rms_norm.linear1",
    "ada_rms_norm_t_cond.2": "ada_rms_norm.linear2",
}


def _permute_for_hf(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Mistral interleaved q/k rows -> HF rotate-half rows (HF conversion script's permute)."""
    dim = tensor.shape[0] // heads
    rest = tensor.shape[1:]
    return tensor.reshape(heads, dim // 2, 2, *rest).transpose(1, 2).reshape(tensor.shape)


def hf_config_for(model_dir: Path):
    """VoxtralRealtimeConfig equivalent to a Mistral params.json (docs/MODEL.md §1)."""
    from transformers import VoxtralRealtimeConfig

    p = json.loads((model_dir / "params.json").read_text())
    e = p["multimodal"]["whisper_model_args"]["encoder_args"]
    tekken = json.loads((model_dir / "tekken.json").read_text())
    delay = tekken["audio"]["transcription_delay_ms"] // 80
    return VoxtralRealtimeConfig(
        audio_config=dict(
            hidden_size=e["dim"], intermediate_size=e["hidden_dim"], num_hidden_layers=e["n_layers"],
            num_attention_heads=e["n_heads"], head_dim=e["head_dim"], num_mel_bins=128,
            sliding_window=e["sliding_window"], rms_norm_eps=e["norm_eps"], max_position_embeddings=1500,
            rope_parameters={"rope_type": "default", "rope_theta": e["rope_theta"]},
        ),
        text_config=dict(
            vocab_size=p["vocab_size"], hidden_size=p["dim"], intermediate_size=p["hidden_dim"],
            num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"],
            head_dim=p["head_dim"], sliding_window=p["sliding_window"], rms_norm_eps=p["norm_eps"],
            max_position_embeddings=131072, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": p["rope_theta"]},
        ),
        projector_hidden_act="gelu", audio_length_per_tok=8, default_num_delay_tokens=delay, downsample_factor=4,
    )  # fmt: skip


def hf_state_dict_for(model_dir: Path) -> dict[str, torch.Tensor]:
    """The Mistral checkpoint's tensors under transformers' in-memory names, q/k permuted."""
    from safetensors.torch import load_file

    p = json.loads((model_dir / "params.json").read_text())
    e = p["multimodal"]["whisper_model_args"]["encoder_args"]
    out = {}
    for name, tensor in load_file(str(model_dir / "consolidated.safetensors")).items():
        if name.startswith("mm_streams_embeddings.embedding_module.whisper_encoder."):
            rest = name.split("whisper_encoder.", 1)[1]
            if m := re.fullmatch(r"conv_layers\.(\d)\.conv\.(weight|bias)", rest):
                hf = f"model.audio_tower.embedder.conv{int(m[1]) + 1}.{m[2]}"
            elif rest == "transformer.norm.weight":
                hf = "model.audio_tower.norm.weight"
            else:
                m = re.fullmatch(r"transformer\.layers\.(\d+)\.(.+)\.(weight|bias)", rest)
                sub = {"attention_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm"}.get(m[2])
                hf = f"model.audio_tower.layers.{m[1]}.{sub or _HF_LAYER_NAMES[m[2]]}.{m[3]}"
                if m[2] in ("attention.wq", "attention.wk"):
                    tensor = _permute_for_hf(tensor, e["n_heads"])
        elif "audio_language_projection" in name:
            hf = "model.multi_modal_projector.linear_" + ("1" if ".0." in name else "2") + ".weight"
        elif name.endswith("tok_embeddings.weight"):
            hf = "model.language_model.embed_tokens.weight"
            out["lm_head.weight"] = tensor
        elif name == "norm.weight":
            hf = "model.language_model.norm.weight"
        else:
            m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
            sub = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}.get(m[2])
            hf = f"model.language_model.layers.{m[1]}.{sub or _HF_LAYER_NAMES[m[2]]}.weight"
            if m[2] == "attention.wq":
                tensor = _permute_for_hf(tensor, p["n_heads"])
            elif m[2] == "attention.wk":
                tensor = _permute_for_hf(tensor, p["n_kv_heads"])
        out[hf] = tensor
    return out


def hf_model_for(model_dir: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' VoxtralRealtimeForConditionalGeneration holding the same weights, in `dtype` on `device`."""
    from transformers import VoxtralRealtimeForConditionalGeneration

    with torch.device(device):
        model = VoxtralRealtimeForConditionalGeneration._from_config(hf_config_for(model_dir), dtype=dtype)
    missing, unexpected = model.load_state_dict(hf_state_dict_for(model_dir), strict=False)
    if unexpected or [k for k in missing if "inv_freq" not in k]:
        raise RuntimeError(f"weights do not fit the transformers model: missing {missing}, unexpected {unexpected}")
    return model.eval()
