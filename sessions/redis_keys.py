"""The names of parley's keys in Redis, in one place.

Everything that belongs to a session carries the session's hash tag, ``parley:{<ui_session_id>}:...``, so that on
a Redis Cluster a session's keys share one slot and every script or transaction on them touches that slot alone.
What belongs to an owner (their list of sessions, their stream slots) carries the owner's tag,
``parley:{owner:<owner>}:...``, and a process's cancel channel its own, ``parley:{<process id>}:cancel``. No key
is shared by every chat.
"""

from __future__ import annotations


class SessionKeys:
    """The keys of one session."""

    __slots__ = (
        "base",
        "claim",
        "file_ids",
        "files",
        "leases",
        "message_ids",
        "messages",
        "queue",
        "session",
        "statuses",
        "streaming",
    )

    def __init__(self, prefix: str, session_id: str) -> None:
        base = self.base = f"{prefix}{{{session_id}}}:"
        self.session = base + "session"  # hash: agent, created_at, owner
        self.message_ids = base + "message-ids"  # list: the messages in order
        self.messages = base + "messages"  # hash: message id → the message (JSON, without its status)
        self.statuses = base + "statuses"  # hash: message id → its status
        self.streaming = base + "streaming"  # set: the ids of its replies still streaming
        # hash: reply id → until when its owner may record it (see _ORPHANED in sessions.redis_scripts)
        self.leases = base + "leases"
        self.file_ids = base + "file-ids"  # list: its files in order
        self.files = base + "files"  # hash: file id → the file's record (JSON)
        self.claim = base + "claim"  # string: "<process>:<interaction>", while an interaction holds the session
        # hash: interaction → "<place> <until> <process> <owner>", the messages that wait for it (see redis_queue)
        self.queue = base + "queue"

    def cancel_left(self, interaction_id: str) -> str:
        """A cancel its owner's process did not answer, for it to find at its next renewal."""
        return f"{self.base}cancel-left:{interaction_id}"

    def cancelled(self, interaction_id: str) -> str:
        """Says for a while that the interaction's reply was recorded cancelled."""
        return f"{self.base}cancelled:{interaction_id}"

    def cancel_reply(self, request_id: str) -> str:
        """Where a cancel's answer comes back."""
        return f"{self.base}cancel-reply:{request_id}"

    def frames(self, interaction_id: str) -> str:
        """The stream that mirrors a reply for rejoins from other processes."""
        return f"{self.base}frames:{interaction_id}"


def session_id_of(key: str, prefix: str) -> str | None:
    """The session a key of :class:`SessionKeys` belongs to."""
    if not key.startswith(prefix + "{"):
        return None
    session_id, closed, _ = key[len(prefix) + 1 :].partition("}")
    return session_id if closed else None


def owner_sessions(prefix: str, owner: str) -> str:
    """Sorted set: the owner's session ids, by creation time."""
    return f"{prefix}{{owner:{owner}}}:sessions"


def owner_streams(prefix: str, owner: str) -> str:
    """Sorted set: the interactions holding one of the owner's stream slots, by when their lease runs out."""
    return f"{prefix}{{owner:{owner}}}:streams"


def process_channel(prefix: str, process_id: str) -> str:
    """The channel a process hears cancels and follow requests on (sharded pub/sub on a cluster)."""
    return f"{prefix}{{{process_id}}}:cancel"
