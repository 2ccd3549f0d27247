"""Logprobs in OpenAI's two formats: legacy completions and chat."""

from __future__ import annotations

from parallm.outputs import Logprob
from parallm.server.protocol import CompletionLogprobs, TokenLogprob, TopLogprob


def _token_text(token_id: int, lp: Logprob) -> str:
    return lp.decoded_token if lp.decoded_token is not None else f"token_id:{token_id}"


def _by_rank(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], text_offset: int
) -> CompletionLogprobs:
    """The legacy completions format: tokens, their logprobs, top alternatives, text offsets."""
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        token = _token_text(token_id, entry[token_id])
        result.tokens.append(token)
        result.token_logprobs.append(entry[token_id].logprob)
        result.top_logprobs.append({_token_text(t, lp): lp.logprob for t, lp in _by_rank(entry)})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], top: int
) -> list[TokenLogprob]:
    """The chat format: one record per token with its ``top`` likeliest alternatives."""
    records = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        chosen = entry[token_id]
        alternatives = [
            _top_logprob(t, lp)
            for t, lp in _by_rank(entry)
            if lp.rank is not None and lp.rank <= top
        ][:top]
        text = _token_text(token_id, chosen)
        records.append(
            TokenLogprob(
                token=text,
                logprob=chosen.logprob,
                bytes=list(text.encode()),
                top_logprobs=alternatives,
            )
        )
    return records


def _top_logprob(token_id: int, lp: Logprob) -> TopLogprob:
    text = _token_text(token_id, lp)
    return TopLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()))
