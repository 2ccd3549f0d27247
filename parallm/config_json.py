"""The one way a JSON-valued engine argument enters (vLLM's ``speculative_config``,
``profiler_config``): a dict, or a JSON object string as the CLI passes it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def config_fields(value: Any, cls: type, name: str, example: str) -> dict[str, Any] | None:
    """``value`` as keyword arguments of the dataclass ``cls``; None for None or JSON null.

    A ValueError naming ``name`` for text that is not JSON (``example`` shows the form), a
    value that is not a mapping, or a key that ``cls`` does not have (the allowed ones listed).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{name} must be a JSON object such as {example}, got {value!r} ({e.msg})"
            ) from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            f"{name} must be a dict, a JSON object string or a {cls.__name__}, "
            f"got {type(value).__name__}"
        )
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; allowed: {allowed}")
    return value
