"""Where a GPU stage's compiled Triton kernels live on disk, so that every start of the stage finds them."""

from __future__ import annotations

import os

import torch

TRITON_CACHE_VARIABLE = "TRITON_CACHE_DIR"


def pin_triton_cache(device: torch.device) -> None:
    """Point Triton's kernel cache at inductor's directory for `device`, unless the user chose one.

    Inductor points it there itself, but only in a process that compiles a kernel of its own; a start whose
    compiled code all came from inductor's cache leaves it at Triton's default. Without the pin, the stage's
    own kernels (attention and the products) would be cached in one directory on a first start and looked
    for in the other on later ones, and compiled again on every start.
    """
    if device.type != "cuda" or TRITON_CACHE_VARIABLE in os.environ:
        return
    try:
        from torch._inductor.runtime.cache_dir_utils import triton_cache_dir
    except ImportError:  # a torch without inductor: Triton's default is then the only directory in play
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    os.environ[TRITON_CACHE_VARIABLE] = triton_cache_dir(index)
