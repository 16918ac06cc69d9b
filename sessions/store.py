from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from parley.sessions.parts import Part, text_parts

Role = Literal["user", "assistant"]
# "streaming" marks the assistant turn of an interaction in progress; every other status is terminal.
MessageStatus = Literal["complete", "streaming", "cancelled", "disconnected", "error", "interrupted"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"complete", "cancelled", "disconnected", "error", "interrupted"})


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def new_ordered_id(prefix: str) -> str:
    """Like :func:`new_id`, but the ids sort by creation time (to the microsecond) before their random part.

    For rows that are indexed by id and made all the time (messages): a new id lands at the end of the
    index rather than on a random page of it, so a SQLite commit writes about 2 pages per chat instead of 4.4.
    """
    return f"{prefix}{time.time_ns() // 1000:014x}{secrets.token_hex(9)}"


def ignore_error(store: str) -> None:
    """A store's ``on_error`` until the app points it elsewhere (its metrics)."""


def utcnow() -> str:
    """Now, in UTC, as ISO 8601 to the microsecond: ``2026-12-05T14:00:40.646192Z``."""
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{_utc_second(seconds)}.{micros:06d}Z"


@functools.lru_cache(maxsize=2)  # every chat stamps its messages: format the date and time once a second, not each
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


TITLE_MAX_CHARS = 200  # a title a client sets
DERIVED_TITLE_CHARS = 80  # one taken from the first user message


def derived_title(text: str | None) -> str | None:
    """A session's title when its client set none: its first user message, whitespace folded, cut at 80
    characters with an ellipsis; None before there is one."""
    if text is None:
        return None
    folded = " ".join(text.split())
    if len(folded) > DERIVED_TITLE_CHARS:
        folded = folded[: DERIVED_TITLE_CHARS - 1].rstrip() + "…"
    return folded or None


@dataclass(frozen=True)
class Session:
    ui_session_id: str
    agent: str
    created_at: str
    # Who may see and touch it (see auth.py): fixed at creation. "" is the open owner (auth.OPEN_OWNER),
    # which is also the owner of every session stored before owners existed.
    owner: str = ""
    # The title its client set, or else (as the stores read it) derived_title() of its first user message.
    title: str | None = None

    def to_json(self) -> dict[str, Any]:
        # The owner stays out of the API: a client knows who it is, and the spec's bodies stay as they are.
        return {
            "ui_session_id": self.ui_session_id,
            "agent": self.agent,
            "created_at": self.created_at,
            "title": self.title,
        }


@dataclass(frozen=True)
class Message:
    id: str
    session_id: str
    role: Role
    content: str
    file_ids: Sequence[str]
    status: MessageStatus
    interaction_id: str
    created_at: str
    # The id its client gave it (the AI SDK names its user messages itself), if any: the id the API shows, and the
    # one a replace finds it by. Kept apart from ``id``, the store's key, so that no client can pick another
    # session's message id.
    client_id: str = ""
    # The AI SDK's UIMessage parts (see sessions/parts.py); None for a message of text alone (a user's, a reply
    # with no reasoning nor tool calls, any message stored before parts existed), whose parts are its text.
    parts: Sequence[Part] | None = None
    # The tokens the reply used (input_tokens, output_tokens, total_tokens, ...), or None when the agent said none.
    usage: Mapping[str, int] | None = None

    def all_parts(self) -> list[Part]:
        return list(self.parts) if self.parts is not None else text_parts(self.role, self.content)

    def to_json(self) -> dict[str, Any]:
        # parts and metadata make it a UIMessage as the AI SDK's useChat({messages}) takes it, as it is: the
        # metadata is what the reply's stream gave the client (start's, merged with finish's).
        return {
            "id": self.client_id or self.id,
            "role": self.role,
            "content": self.content,
            "parts": self.all_parts(),
            "usage": dict(self.usage) if self.usage is not None else None,
            "metadata": {
                "ui_session_id": self.session_id,
                "interaction_id": self.interaction_id,
                "status": self.status,
            },
            "file_ids": list(self.file_ids),
            "status": self.status,
            "interaction_id": self.interaction_id,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class FileInfo:
    id: str
    session_id: str
    filename: str
    mime_type: str
    size: int
    sha256: str
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "filename": self.filename,
            "mime_type": self.mime_type,
            "size": self.size,
            "sha256": self.sha256,
            "created_at": self.created_at,
        }


class HistoryLimits:
    """How many earlier messages a session's agent is given: ``limits(session)`` (which raises what ``unknown``
    raises for an agent not configured here), or every configured agent's at once (``by_agent``), for a store
    that reads a session and its history in one round trip (Redis). Stores may take any ``Callable[[Session],
    int]`` instead; this one saves the Redis store a round trip."""

    __slots__ = ("by_agent", "unknown")

    def __init__(self, by_agent: Mapping[str, int], unknown: Callable[[Session], int]) -> None:
        self.by_agent = by_agent
        self.unknown = unknown

    def __call__(self, session: Session) -> int:
        limit = self.by_agent.get(session.agent)
        return self.unknown(session) if limit is None else limit


class Store(Protocol):
    """Where sessions, their history and their files' metadata live.

    Implementations: :class:`sessions.sqlite.SQLiteStore` (embedded default), :class:`sessions.redis.RedisStore`
    and :class:`sessions.postgres.PostgresStore` (scale-out). All pass the same tests in ``tests/test_store.py``.

    Every session has an owner. The calls that find a session by its id take the request's owner, and
    another owner's session is exactly a session that does not exist (None, False, SessionNotFound). Session ids are
    global, though: :meth:`create_session` refuses an id that any owner has taken. The other calls take a
    session id that the caller has already found for its owner.
    """

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def create_session(self, session: Session) -> None:
        """Raises :class:`sessions.errors.SessionExists` when the id is taken."""

    async def get_session(self, session_id: str, owner: str) -> Session | None:
        """The session with its title: the one set (on create, or by :meth:`set_title`), or else
        :func:`derived_title` of its first user message."""

    async def list_sessions(self, owner: str, limit: int, offset: int) -> list[Session]:
        """The owner's sessions, newest first, titled as :meth:`get_session` titles them."""

    async def set_title(self, session_id: str, owner: str, title: str | None) -> bool:
        """Set the owner's session's title (None: back to the derived one); False if the owner has no such
        session."""

    async def delete_session(self, session_id: str, owner: str) -> list[str] | None:
        """Delete the owner's session with its history and its files' records, in one transaction; return the
        ids of the files removed (their bytes are the caller's to delete), or None if the owner has no such
        session."""

    async def start_turn(
        self, user: Message, assistant: Message, history_limit: Callable[[Session], int], *, owner: str
    ) -> tuple[Session, list[Message]]:
        """Store the user's message and the assistant's ``streaming`` placeholder together, and return the
        session (its title left out: None) with its latest messages before them (what the agent is given), as many as
        ``history_limit(session)`` says: that depends on the session's agent, which this call is the first
        to read. Raises :class:`sessions.errors.SessionNotFound` when the session does not exist or is not
        ``owner``'s (checked in the same round trip: a chat pays nothing for it; ``SessionGone`` when it is
        deleted meanwhile), and whatever ``history_limit`` raises, in all cases with nothing stored."""

    async def replace_turn(
        self,
        target: str,
        user: Message,
        assistant: Message,
        history_limit: Callable[[Session], int],
        *,
        owner: str,
        missing_ok: bool = False,
        keep: bool = False,
    ) -> tuple[Session, list[Message], Message]:
        """:meth:`start_turn` in the place of the session's message ``target`` (its id as the API shows it), in one
        step: a user message (an edit) is dropped with everything after it, and ``user`` and ``assistant`` take
        its place; an assistant reply (a regenerate) is dropped with everything after it, and ``assistant`` takes
        its place after the same user message (``user`` is not stored). With ``keep`` (a regenerate from a user
        message), a user message stays, what follows it is dropped, and ``assistant`` follows it.

        Returns the session, its latest messages before the turn's user message (as many as ``history_limit``
        says) and the turn's user message (the one kept, or ``user``). Raises
        :class:`sessions.errors.MessageNotFound` when the session has no ``target`` (unless ``missing_ok``: then
        it is :meth:`start_turn`), :class:`sessions.errors.EditWithoutText` when an edit's ``user`` has no text, and
        what :meth:`start_turn` raises; in all these cases with nothing changed.
        """

    async def finish_turn(
        self,
        message_id: str,
        content: str,
        status: MessageStatus,
        *,
        parts: Sequence[Part] | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> None:
        """Give the assistant's placeholder its final text, parts (None: text alone, see :class:`Message`), usage
        and terminal status."""

    async def checkpoint_turns(
        self,
        contents: Mapping[str, str],
        parts: Mapping[str, Sequence[Part]] | None = None,
        usages: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        """Save the text so far of replies still ``streaming`` (message id → text; readers see it, it survives a
        crash), the parts so far of those that are not text alone (``parts``) and the usage so far of those that
        have one (``usages``), in one write for them all. A reply no longer ``streaming`` is left as it is."""

    async def interrupt_turns(self, session_id: str | None = None) -> int:
        """Mark ``streaming`` turns whose process is gone as ``interrupted`` (all of them, or one session's)."""

    async def list_messages(self, session_id: str) -> list[Message]: ...

    async def streaming_turn(self, session_id: str) -> str | None:
        """The interaction id of the session's turn still marked ``streaming``, if there is one."""

    async def add_file(self, info: FileInfo) -> None:
        """Raises :class:`sessions.errors.SessionNotFound` when the session does not exist (checked in the same
        transaction as the write: a file record never outlives its session)."""

    async def get_file(self, session_id: str, file_id: str) -> FileInfo | None: ...
    async def list_files(self, session_id: str) -> list[FileInfo]: ...
    async def delete_file(self, session_id: str, file_id: str) -> bool: ...
