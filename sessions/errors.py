"""Every failure the server's domain raises on purpose, as one tree. They know nothing of HTTP: the web layer maps
each to a status and a body in one table (:mod:`parley.errors`, which draws the whole picture with the statuses).

    ParleyError               a request that cannot be served; its message is said to the client as it is
     ├── SessionError
     │    ├── SessionNotFound  the session does not exist, or is another owner's (told apart by nobody)
     │    └── SessionGone      the session was deleted while the request was using it
     ├── FileNotFound          the file does not exist, or its bytes went with a delete
     ├── MessageNotFound       a chat's replace (or the AI SDK's messageId) names no message of the session
     ├── EditWithoutText       a replace of a user message (an edit) without its new text
     ├── SessionBusy           the session already has an interaction in progress (if_busy reject)
     ├── Dequeued              a message that waited its turn (if_busy) was cancelled, or its client left
     ├── TooManyQueued         PARLEY_MAX_QUEUED messages wait for the session already (if_busy enqueue)
     ├── SessionExists         a client-chosen ui_session_id is taken
     ├── TooManyStreams        the owner already has PARLEY_MAX_STREAMS_PER_OWNER replies running
     ├── CancelFailed          a cancel that could not be delivered to the process that owns the stream
     ├── RejoinFailed          a rejoin of a reply that another process streams, which this one cannot reach
     ├── StoreUnavailable      the shared store (Redis) cannot be reached right now
     └── AgentUnavailable      the session's agent is not configured on this server (any more)

    agents.AgentError          the agent failed (see :mod:`parley.agents`)
     └── agents.UpstreamError  the model server refused, failed or timed out

Not answered to a client, but refused at start-up:

    EventLoopUnsupported       a store or coordinator that needs asyncio (Redis, PostgreSQL) run on another
                               event loop (trio)

Messages are sentences a person understands: no tracebacks, no internals, no secrets (never a key).
"""

from __future__ import annotations


class ParleyError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# The name this base had while it carried HTTP statuses: sessions/redis_coordinator.py and redis_limits.py still
# catch it by that name.
ApiError = ParleyError


class SessionError(ParleyError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session not found: {session_id}")
        self.session_id = session_id


class SessionNotFound(SessionError):
    pass


class SessionGone(SessionError):
    pass


class FileNotFound(ParleyError):
    def __init__(self, file_id: str) -> None:
        super().__init__(f"File not found: {file_id}")
        self.file_id = file_id


class SessionBusy(ParleyError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session {session_id} already has an interaction in progress; cancel it or wait.")


class MessageNotFound(ParleyError):
    """A chat's replace (or the AI SDK's messageId) names no message of the session."""

    def __init__(self, message_id: str) -> None:
        super().__init__(f"Message not found: {message_id}")
        self.message_id = message_id


class EditWithoutText(ParleyError):
    def __init__(self) -> None:
        super().__init__("An edit needs the message's new text.")


class Dequeued(ParleyError):
    """A message that waited its turn (if_busy) was taken out of the line: cancelled, or its client left."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"The message for session {session_id} was cancelled while it waited for the reply in progress; "
            "nothing was recorded."
        )


class TooManyQueued(ParleyError):
    retry_after_seconds = 1

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"Too many messages already wait for this session's reply in progress (the limit is {limit}): "
            "try again when one has run."
        )


class SessionExists(ParleyError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session already exists: {session_id}")


class TooManyStreams(ParleyError):
    retry_after_seconds = 1  # replies usually end within seconds, and a slot frees when one does

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"Too many replies running at once for this owner (the limit is {limit}): wait for one to end, "
            "or cancel one, and try again."
        )


class CancelFailed(ParleyError):
    pass


class RejoinFailed(ParleyError):
    pass


class StoreUnavailable(ParleyError):
    pass


class AgentUnavailable(ParleyError):
    pass


class EventLoopUnsupported(Exception):
    pass
