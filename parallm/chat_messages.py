"""Chat messages as the offline API and the server accept them: one list of allowed roles."""

from __future__ import annotations

from typing import Any, Literal, get_args

# OpenAI's roles; the server's request model and LLM.chat both check against this one list.
ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)


def check_messages(conversation: list[dict[str, Any]]) -> None:
    """ValueError naming ``messages[i]...`` for an empty conversation, a message that is not a
    dict with ``role`` and ``content``, or a role outside :data:`CHAT_ROLES`."""
    if not conversation:
        raise ValueError("messages must not be empty")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] needs 'role' and 'content', got {message!r}")
        role = message["role"]
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {role!r}")
