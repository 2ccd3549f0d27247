"""The model that ships with parallm: loads by default and completes a function header."""

from __future__ import annotations

import ast

from bundled_quality import needs_bundled

from parallm import LLM, SamplingParams
from parallm.bundled import BUNDLED_MODEL_DIR

pytestmark = needs_bundled


def _function_body(text: str) -> str:
    """The first top-level statement: the header and its indented lines."""
    lines = text.split("\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line and not line.startswith((" ", "\t")):
            break
        kept.append(line)
    return "\n".join(kept).rstrip()


def test_bundled_model_is_the_default_and_writes_valid_python():
    llm = LLM(device="cpu")
    assert llm.engine.config.model == str(BUNDLED_MODEL_DIR)
    prompt = "def fibonacci(n):"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    code = _function_body(prompt + out.outputs[0].text)
    assert code.count("\n") >= 2  # a body, not just the header
    ast.parse(code)


def test_bundled_model_is_small_enough_to_commit():
    size = sum(f.stat().st_size for f in BUNDLED_MODEL_DIR.iterdir())
    assert size <= 24 * 10**6
