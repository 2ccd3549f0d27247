"""What the tests on the bundled trained model share: their skip where it is absent, code
prompts, and held-out text in rows of token ids. (No tests here.)"""

from __future__ import annotations

from typing import Any

import pytest

from parallm.bundled import BUNDLED_MODEL_DIR

needs_bundled = pytest.mark.skipif(
    not (BUNDLED_MODEL_DIR / "config.json").exists(), reason="no bundled model in this checkout"
)
CODE_PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):",
                "import os\n\ndef list_files(path):", "def is_prime(n):",
                "def quicksort(xs):", "for i in range(10):"]  # fmt: skip
# parallm's own source, which the model (trained on the Python standard library) never saw.
HELD_OUT_FILES = ["engine/scheduler.py", "engine/kv_cache.py", "sampling_params.py"]


def held_out_rows(tokenizer: Any, rows: int = 8, length: int = 512) -> list[list[int]]:
    """The first ``rows`` whole rows of ``length`` token ids of the held-out text."""
    package = BUNDLED_MODEL_DIR.parent.parent
    text = "\n".join((package / f).read_text() for f in HELD_OUT_FILES)
    ids = tokenizer(text)["input_ids"]
    return [ids[i : i + length] for i in range(0, len(ids) - length, length)][:rows]
