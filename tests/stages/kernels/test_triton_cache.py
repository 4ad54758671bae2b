"""A GPU stage keeps its Triton kernels where inductor keeps them, so every start finds them."""

from __future__ import annotations

import os

import torch

from voxtral_run.stages.kernels.triton_cache import TRITON_CACHE_VARIABLE, pin_triton_cache


def test_a_gpu_stage_pins_tritons_cache_to_inductors_directory_for_its_device(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(TRITON_CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    pin_triton_cache(torch.device("cuda", 1))
    assert os.environ[TRITON_CACHE_VARIABLE] == str(tmp_path / "triton" / "1")


def test_a_users_own_triton_cache_is_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(TRITON_CACHE_VARIABLE, str(tmp_path / "mine"))
    pin_triton_cache(torch.device("cuda", 0))
    assert os.environ[TRITON_CACHE_VARIABLE] == str(tmp_path / "mine")


def test_a_cpu_stage_leaves_the_environment_alone(monkeypatch) -> None:
    monkeypatch.delenv(TRITON_CACHE_VARIABLE, raising=False)
    pin_triton_cache(torch.device("cpu"))
    assert TRITON_CACHE_VARIABLE not in os.environ
