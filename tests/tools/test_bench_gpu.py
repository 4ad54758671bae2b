"""The GPU benchmark's measuring aids that run on a CPU."""

import numpy as np
import torch

from tests.conftest import speechlike_audio
from voxtral_run.stages.audio.constants import delay_tokens, pad_audio
from voxtral_run.stages.audio.mel import log_mel_frames
from voxtral_run.stages.model.checkpoint import ModelDir
from voxtral_run.stages.model.decoder import streaming_prompt
from voxtral_run.tools.bench_gpu import products_summed_in_reverse


def test_products_summed_in_reverse_change_only_the_order_of_additions(tiny_model_dir, hf_oracle) -> None:
    """transformers with its sums reversed computes the same logits up to float32 rounding, and not the same
    bits (the order did change); afterwards the model is as it was."""
    model = ModelDir(tiny_model_dir)
    num_delay = delay_tokens(480)
    mel = log_mel_frames(pad_audio(speechlike_audio(1.0), model.tekken.audio.streaming_n_left_pad_tokens, num_delay))
    prompt = streaming_prompt(model.tekken, num_delay)
    positions = mel.shape[0] // 8
    ids = torch.tensor(prompt + np.random.default_rng(0).integers(0, 1000, positions - len(prompt)).tolist())
    hf_model = hf_oracle(tiny_model_dir)
    inputs = {
        "input_ids": ids[None],
        "input_features": torch.from_numpy(mel.T[None].copy()),
        "num_delay_tokens": num_delay,
    }

    with torch.inference_mode():
        before = hf_model(**inputs).logits
        with products_summed_in_reverse(hf_model):
            reversed_sums = hf_model(**inputs).logits
        after = hf_model(**inputs).logits

    torch.testing.assert_close(reversed_sums, before, rtol=1e-4, atol=1e-5)
    assert not torch.equal(reversed_sums, before)
    assert torch.equal(after, before)
    assert not any("forward" in vars(m) for m in hf_model.modules())
