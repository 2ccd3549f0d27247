"""Where the model that ships with parallm lives."""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).parent / "assets" / "code-model"
BUNDLED_MODEL_NAME = "parallm-code-8m"  # what `parallm serve` calls it when --model is omitted


def default_model_path() -> str:
    """The bundled model's directory; a clear error if this checkout has none."""
    if (BUNDLED_MODEL_DIR / "config.json").exists():
        return str(BUNDLED_MODEL_DIR)
    raise ValueError(
        f"model: no --model given and no bundled model at {BUNDLED_MODEL_DIR}; "
        "pass --model PATH (a Hugging Face model directory), or create a small random one "
        "with `parallm make-tiny-model runs/tiny`"
    )
