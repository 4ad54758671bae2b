"""voxtral-run's tests.

Without a GPU, Triton kernels run in Triton's CPU interpreter, which is chosen when a kernel is defined: so
here, before any test module imports a stage.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
