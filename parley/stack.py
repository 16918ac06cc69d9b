"""The app's ASGI stack: Starlette's, without the cost it adds to every ``send``.

Starlette puts ServerErrorMiddleware outside the middleware it is given and ExceptionMiddleware inside, before the
router. Each wraps ``send`` in a coroutine of its own, so every token of a stream pays for two more coroutines
than the server's own send. parley's stack, outermost first:

- Telemetry (:mod:`sessions.telemetry`), the first middleware given, answers an unhandled exception itself (a
  JSON 500 with the request id, logged once with its traceback): ServerErrorMiddleware never had one left to
  answer, and is left out.
- CORS, when configured.
- :class:`ExceptionHandlers`, ExceptionMiddleware's work for parley: an exception raised before the response
  started is answered by its handler's response. Its ``send`` wrapper is a plain function.
- The router.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Handler = Callable[[Request, Exception], Awaitable[Response]]


class App(Starlette):
    """A Starlette app whose exception handlers are keyed by exception class and are async functions (not by
    status code), and without ``max_body_size`` (parley bounds its bodies itself)."""

    def build_middleware_stack(self) -> ASGIApp:
        assert self.max_body_size is None and all(isinstance(key, type) for key in self.exception_handlers)
        app: ASGIApp = ExceptionHandlers(self.router, self.exception_handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app


class ExceptionHandlers:
    """ASGI middleware: an exception raised before the response started is answered with the response of the
    handler of its class (the nearest in its MRO); after, it is re-raised as a RuntimeError (as Starlette does),
    for the server to abort the response. An exception without a handler goes on up."""

    def __init__(self, app: ASGIApp, handlers: Mapping[type[Exception], Handler]) -> None:
        self.app = app
        self.handlers = dict(handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        def sender(message: Message) -> Awaitable[None]:
            # A plain function that returns send's awaitable: no coroutine of its own on every token of a stream.
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            return send(message)

        try:
            await self.app(scope, receive, sender)
        except Exception as exc:
            handler = next((self.handlers[cls] for cls in type(exc).__mro__ if cls in self.handlers), None)
            if handler is None:
                raise
            if started:
                raise RuntimeError("Caught handled exception, but response already started.") from exc
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
