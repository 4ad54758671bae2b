"""voxtral-run's tests.

Without a GPU, Triton kernels run in Triton's CPU interpreter, which is chosen when a kernel is defined: so
here, before any test module imports a stage. Decided once, in the test session: the processes it starts
inherit the choice (a toy stage's process imports this package, and need not import torch to decide).
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
