"""Where the model comes from: a local directory, or a Hugging Face repo id fetched into the hub cache."""

from __future__ import annotations

import re
from pathlib import Path

from voxtral_run.stages.base import CheckpointError

# The files of a Mistral-layout checkpoint that the stages read (see checkpoint.py).
MODEL_FILES = ("params.json", "consolidated.safetensors", "tekken.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or not _REPO_ID.match(model)


def resolve_model(model: str) -> Path:
    """The model directory for `model`: an existing directory as is, else a repo id from the hub cache,
    downloading it when missing (needs the optional huggingface_hub package and a network)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if _looks_like_path(model):
        raise CheckpointError(f"model directory {model} does not exist")
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"model {model} is not a local directory, and fetching it from Hugging Face needs "
            "huggingface_hub (pip install 'voxtral-run[hub]')"
        ) from None
    try:
        return Path(huggingface_hub.snapshot_download(model, allow_patterns=list(MODEL_FILES), local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(huggingface_hub.snapshot_download(model, allow_patterns=list(MODEL_FILES)))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"model {model} is not in the Hugging Face cache and cannot be downloaded: offline "
            "(HF_HUB_OFFLINE is set or the hub is unreachable); pass a local model directory instead"
        ) from None
    except Exception as error:  # noqa: BLE001 - hub errors (auth, missing repo, network) are many classes
        raise CheckpointError(f"model {model}: download failed ({' '.join(str(error).split())})") from None
