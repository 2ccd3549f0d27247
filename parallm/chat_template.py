"""A chat template given by the user: a file, or the Jinja template text itself (as vLLM's
``--chat-template`` takes either)."""

from __future__ import annotations

from pathlib import Path

# Characters a Jinja template has and a file name hardly ever does (vLLM tells them apart so).
_TEMPLATE_CHARS = "{}\n"


def load_chat_template(value: str) -> str:
    """The template text of ``value`` (a file's contents, or ``value`` itself), checked to parse.

    ValueError naming ``chat_template`` when it is neither a file nor a valid Jinja template."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"chat_template must be a file or a Jinja template, got {value!r}")
    path = Path(value).expanduser()
    if path.is_file():
        template = path.read_text()
    elif any(c in value for c in _TEMPLATE_CHARS):
        template = value
    else:
        raise ValueError(
            f"chat_template: {value!r} is no file, nor a Jinja template (which would hold "
            "'{', '}' or a line break)"
        )
    _check_syntax(template, value)
    return template


def _check_syntax(template: str, source: str) -> None:
    # Compiled as transformers compiles it for apply_chat_template (its own tags included), so
    # that a broken template fails here, where it is given, not in every chat request.
    from jinja2 import TemplateError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: the first chat request will tell
        return
    try:
        _compile_jinja_template(template)
    except TemplateError as e:
        raise ValueError(f"chat_template {source!r}: not a valid Jinja template: {e}") from None
