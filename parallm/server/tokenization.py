"""``POST /tokenize`` and ``POST /detokenize``: vLLM's routes for counting and reading tokens.

They run no model, so unlike generation they take text of any length (up to the request body
limit) and count it exactly.
"""

from __future__ import annotations

import asyncio

from parallm.server.chat import render_chat
from parallm.server.errors import bad_request
from parallm.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from parallm.server.serving import ServingContext


async def create_tokenize(ctx: ServingContext, req: TokenizeRequest) -> TokenizeResponse:
    ctx.model_name(req.model)
    if req.prompt is None and req.messages is None:
        raise bad_request(
            "'prompt' (text) or 'messages' (a chat) is required", "prompt",
            "missing_required_parameter",
        )  # fmt: skip
    if req.prompt is not None and req.messages is not None:
        raise bad_request("send either 'prompt' or 'messages', not both", "messages")
    if req.messages is not None and not req.messages:
        raise bad_request("messages must not be empty", "messages")
    # Long text takes a while to tokenize: keep it off the event loop.
    return await asyncio.to_thread(_tokenize, ctx, req)


def _tokenize(ctx: ServingContext, req: TokenizeRequest) -> TokenizeResponse:
    tokenizer = ctx.require_tokenizer("/tokenize")
    if req.messages is not None:
        text = render_chat(ctx, req.messages, req.add_generation_prompt)
        special = bool(req.add_special_tokens)
    else:
        text = req.prompt or ""
        special = req.add_special_tokens is not False
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=ctx.max_model_len, tokens=ids, token_strs=strs
    )


async def create_detokenize(ctx: ServingContext, req: DetokenizeRequest) -> DetokenizeResponse:
    ctx.model_name(req.model)
    tokenizer = ctx.require_tokenizer("/detokenize")
    ctx.check_token_ids(req.tokens, "tokens")  # before decoding: the decoder raises on them
    return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, req.tokens))
