"""Server-sent events: how a streamed response is framed, ended and cleaned up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from parallm.server.async_engine import RequestStream
from parallm.server.errors import error_from

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events of one request; closing the request however the response ends.

    Starlette cancels the body iterator when the client disconnects, but a client that leaves
    before the first byte may stop the response before the iterator ever starts, so its
    ``finally`` would never run: closing here covers that case too.
    """

    def __init__(self, stream: RequestStream, events: AsyncIterator[str]) -> None:
        super().__init__(_sse_events(stream, events), media_type="text/event-stream")
        self._stream = stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


async def _sse_events(stream: RequestStream, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Wrap a request's events: an error becomes an error event, and the stream always ends
    with ``[DONE]``. A client that leaves cancels this generator, and ``close()`` aborts."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        yield sse(error_from(exc).body())
    finally:
        stream.close()
    yield SSE_DONE
