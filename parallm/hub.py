"""Model and tokenizer names: a local directory, or a Hugging Face Hub id fetched through
``huggingface_hub`` (the local cache first, then a download unless ``HF_HUB_OFFLINE`` is set)."""

from __future__ import annotations

import os
from pathlib import Path

# What the engine reads from a model repository: configs, weights, tokenizer files and chat
# templates. Other weight formats (.bin, .pt, .gguf) and everything else are never fetched.
_CONFIG_PATTERNS = ["*.json", "*.jinja"]
TOKENIZER_PATTERNS = [*_CONFIG_PATTERNS, "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt"]
MODEL_PATTERNS = [*TOKENIZER_PATTERNS, "*.safetensors"]
# load_format="dummy" makes random weights: the config (and a tokenizer if any) is enough.
DUMMY_MODEL_PATTERNS = TOKENIZER_PATTERNS

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE``, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    return env.strip().lower() in _TRUE if env is not None else bool(constants.HF_HUB_OFFLINE)


def resolve_model_dir(
    name: str,
    *,
    field: str = "model",
    revision: str | None = None,
    download_dir: str | None = None,
    patterns: list[str] = MODEL_PATTERNS,
    required: tuple[str, ...] = ("config.json",),
) -> str:
    """The local directory behind ``name``: itself if it is a directory, else the snapshot of
    the Hub repository ``name`` at ``revision`` in the cache at ``download_dir`` (default: the
    Hugging Face cache). A cached snapshot that holds every file in ``required`` (glob patterns)
    is used as is; otherwise it is downloaded. ValueError naming ``field`` when it is neither.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field} must be a directory or a Hugging Face Hub id, got {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{field}: {name!r} is a file, not a model directory or Hub id")
    where = _describe(name, revision, download_dir)
    cached = _cached_snapshot(name, field, revision, download_dir, patterns)
    if cached is not None and _has_all(cached, required):
        return cached
    if hub_offline():
        state = "is incomplete" if cached is not None else "is not there"
        raise ValueError(
            f"{field}: {name!r} is not a local directory, and {where} {state}; HF_HUB_OFFLINE is "
            "set, so it cannot be downloaded (unset it, or pass a local directory)"
        )
    snapshot = _download(name, field, revision, download_dir, patterns, where)
    if not _has_all(snapshot, required):
        raise ValueError(
            f"{field}: the Hugging Face Hub repository {name!r} has no files matching "
            f"{list(required)} (looked in {snapshot})"
        )
    return snapshot


def _describe(name: str, revision: str | None, download_dir: str | None) -> str:
    cache = download_dir or "the Hugging Face cache"
    return f"the Hub repository {name!r} (revision {revision or 'main'}) in {cache}"


def _cached_snapshot(
    name: str, field: str, revision: str | None, download_dir: str | None, patterns: list[str]
) -> str | None:
    """The cached snapshot's directory, or None when the cache has none for this revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(
            name, revision=revision, cache_dir=download_dir, allow_patterns=patterns,
            local_files_only=True,
        )  # fmt: skip
    except HFValidationError as e:
        raise ValueError(
            f"{field}: {name!r} is neither a local directory nor a Hugging Face Hub id "
            f"('org/name'): {e}"
        ) from None
    except LocalEntryNotFoundError:
        return None


def _download(
    name: str,
    field: str,
    revision: str | None,
    download_dir: str | None,
    patterns: list[str],
    where: str,
) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            name, revision=revision, cache_dir=download_dir, allow_patterns=patterns
        )
    except (OSError, ValueError) as e:  # not found, gated, no network, bad revision, ...
        raise ValueError(
            f"{field}: {name!r} is not a local directory, and {where} could not be downloaded: "
            f"{type(e).__name__}: {e}"
        ) from None


def _has_all(directory: str, required: tuple[str, ...]) -> bool:
    root = Path(directory)
    return all(any(root.glob(pattern)) for pattern in required)
