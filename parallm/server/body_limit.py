"""Refuse request bodies over a size limit (413) before they are read, let alone parsed."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parallm.server.errors import APIError


class RequestBodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The request body is larger than this server's limit of {limit} bytes "
            "(--max-request-body-bytes).",
            413,
            code="request_too_large",
        )


class BodySizeLimit:
    """A pure ASGI middleware: a declared ``Content-Length`` over the limit is refused before
    the app runs; a body without one (chunked) is counted as it arrives, and the read that
    crosses the limit raises ``RequestBodyTooLarge``, so no more of it is read or kept."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await RequestBodyTooLarge(self.max_bytes).response()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestBodyTooLarge(self.max_bytes)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except RequestBodyTooLarge as e:
            # The app's error handlers answer it when the read was theirs; this covers a read
            # outside them (the exception reached us with nothing sent yet).
            if started:
                raise
            await e.response()(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server rejects a malformed length; count the body instead
    return None
