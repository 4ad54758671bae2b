"""Triton's CPU interpreter as the tests run the kernels in it, patching triton.language once per launch.

At every call of a jit helper inside a kernel the interpreter patches triton.language's modules again (an
`inspect.getmembers` over each), about a third of an interpreted kernel's time here. The modules stay patched until
the launch ends, so within a launch a helper's call patches only modules not patched yet. The kernels compute the
same either way; where the installed Triton's interpreter lacks these pieces, nothing is changed.
"""

from __future__ import annotations

import threading


def patch_language_once_per_launch() -> None:
    """Make each interpreted launch patch each of triton.language's modules once (see the module docstring)."""
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None or not hasattr(interpreter, "_LangPatchScope"):
        return
    run_grid = executor.__call__
    launch = threading.local()  # the language modules patched in this thread's running launch; None between

    def modules(fn) -> frozenset[int]:
        language = interpreter.tl
        return frozenset(id(value) for value in fn.__globals__.values() if value is language or value is language.core)

    def patch_lang_once(fn):
        patched, wanted = getattr(launch, "patched", None), modules(fn)
        if patched is None or not wanted or not wanted <= patched:
            if patched is not None:
                patched |= wanted
            return patch_lang(fn)
        return interpreter._LangPatchScope()  # nothing to undo

    def run_grid_patching_once(self, *args, **kwargs):
        launch.patched = set()
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            launch.patched = None

    interpreter._patch_lang = patch_lang_once
    executor.__call__ = run_grid_patching_once
