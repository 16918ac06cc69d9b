"""Every failure parley answers a client with, as one tree.

    ApiError                  a request that cannot be served as sent; rendered {"status": "error", "message": ...}
     ├── BadRequest           400  a field missing, empty or malformed; a body that cannot be parsed
     ├── Unauthorized         401  no owner: no API key, a wrong or malformed one, or the host app's user is not
     │                             authenticated (auth.py); with API keys it carries WWW-Authenticate: Bearer
     ├── NotFound             404  unknown session, file or route; another owner's session or file, exactly alike
     ├── BodyTimeout          408  a request body that stopped arriving (PARLEY_BODY_TIMEOUT_SECONDS)
     ├── Conflict             409
     │    ├── SessionBusy          the session already has an interaction in progress
     │    └── SessionExists        a client-chosen ui_session_id is taken
     ├── PayloadTooLarge      413  a message, an upload or a whole body over its limit
     ├── TooManyStreams       429  the owner already has PARLEY_MAX_STREAMS_PER_OWNER replies running (Retry-After)
     ├── CancelFailed         500  a cancel that could not be delivered to the process that owns the stream
     ├── RejoinFailed         500  a rejoin of a reply that another process streams, which this one cannot reach
     ├── StoreUnavailable     503  the shared store (Redis) cannot be reached right now
     └── AgentUnavailable     503  the session's agent is not configured on this server (any more)

    agents.AgentError         500  the agent failed before its first token (after it, the stream is aborted)
     └── agents.UpstreamError 502  the model server refused, failed or timed out before the first token

Stores raise domain errors, which know nothing of HTTP; the web layer (:func:`sessions.streaming.http_error`)
maps them to statuses:

    SessionError
     ├── SessionNotFound      404  the session does not exist
     └── SessionGone          404  the session was deleted while the request was using it

Not answered to a client, but refused at start-up:

    EventLoopUnsupported          a store or coordinator that needs asyncio (Redis) run on another event loop (trio)

Messages are sentences a person understands: no tracebacks, no internals, no secrets (never a key).
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    status_code = 500
    headers: Mapping[str, str] = {}

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401

    def __init__(self, message: str, *, bearer: bool) -> None:
        super().__init__(message)
        if bearer:
            self.headers = {"www-authenticate": "Bearer"}


class NotFound(ApiError):
    status_code = 404


class BodyTimeout(ApiError):
    status_code = 408


class Conflict(ApiError):
    status_code = 409


class SessionBusy(Conflict):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id} already has an interaction in progress; cancel it or wait.")


class SessionExists(Conflict):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session already exists: {session_id}")


class PayloadTooLarge(ApiError):
    status_code = 413


class TooManyStreams(ApiError):
    status_code = 429
    retry_after_seconds = 1  # replies usually end within seconds, and a slot frees when one does

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"Too many replies running at once for this owner (the limit is {limit}): wait for one to end, "
            "or cancel one, and try again."
        )
        self.headers = {"retry-after": str(self.retry_after_seconds)}


class CancelFailed(ApiError):
    status_code = 500


class RejoinFailed(ApiError):
    status_code = 500


class StoreUnavailable(ApiError):
    status_code = 503


class AgentUnavailable(ApiError):
    status_code = 503


class SessionError(Exception):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session not found: {session_id}")
        self.session_id = session_id


class SessionNotFound(SessionError):
    pass


class SessionGone(SessionError):
    pass


class EventLoopUnsupported(Exception):
    pass
