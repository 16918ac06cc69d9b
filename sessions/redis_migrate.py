"""Move a Redis store's data from the layout before hash tags to today's: ``python -m parley.sessions.redis_migrate``
(with ``PARLEY_REDIS_URL`` set, or the URL as its argument). Run it once, with parley stopped, before starting a
version that uses hash tags; running it again moves nothing twice.

Before hash tags, a session's keys were ``parley:session:<id>``, ``parley:messages:<id>``, ``parley:msg:<message>``,
``parley:files:<id>``, ``parley:file:<file>``, and the owners' indexes ``parley:sessions`` (the open owner's, and
every session's before owners) and ``parley:owner:<owner>:sessions``; that data lived on one Redis (it could not
run on a cluster). Each session moves in one transaction; a turn left ``streaming`` (parley is stopped) is
recorded ``interrupted``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio

from parley.sessions.redis_keys import SessionKeys, owner_sessions


async def migrate(redis: Any, prefix: str = "parley:") -> int:
    """Move every session stored in the old layout; how many moved."""
    moved = 0
    async for key in redis.scan_iter(match=f"{prefix}session:*", count=1000):
        session_id = str(key)[len(prefix) + len("session:") :]
        fields: dict[str, str] = await redis.hgetall(key)
        if not fields:
            continue
        owner = fields.get("owner", "")
        old_index = f"{prefix}sessions" if owner == "" else f"{prefix}owner:{owner}:sessions"
        score = await redis.zscore(old_index, session_id)
        message_ids: list[str] = await redis.lrange(f"{prefix}messages:{session_id}", 0, -1)
        file_ids: list[str] = await redis.lrange(f"{prefix}files:{session_id}", 0, -1)
        async with redis.pipeline(transaction=False) as pipe:
            for message_id in message_ids:
                pipe.hgetall(f"{prefix}msg:{message_id}")
            for file_id in file_ids:
                pipe.hgetall(f"{prefix}file:{file_id}")
            rows: list[dict[str, str]] = await pipe.execute()
        messages, files = rows[: len(message_ids)], rows[len(message_ids) :]
        new = SessionKeys(prefix, session_id)
        async with redis.pipeline(transaction=True) as pipe:
            session = {"agent": fields["agent"], "created_at": fields["created_at"], "owner": owner}
            pipe.hset(new.session, mapping=session)
            kept = [row for row in messages if row]
            if kept:
                pipe.rpush(new.message_ids, *(row["id"] for row in kept))
                pipe.hset(new.messages, mapping={row["id"]: _message(row) for row in kept})
                statuses = {row["id"]: "interrupted" if row["status"] == "streaming" else row["status"] for row in kept}
                pipe.hset(new.statuses, mapping=statuses)
            records = [row for row in files if row]
            if records:
                pipe.rpush(new.file_ids, *(row["id"] for row in records))
                pipe.hset(new.files, mapping={row["id"]: _file(row) for row in records})
            pipe.zadd(owner_sessions(prefix, owner), {session_id: score if score is not None else 0.0})
            pipe.zrem(old_index, session_id)
            pipe.srem(f"{prefix}streaming", session_id)
            old = [key, f"{prefix}messages:{session_id}", f"{prefix}files:{session_id}"]
            old += [f"{prefix}streaming:{session_id}", f"{prefix}claim:{session_id}"]
            old += [f"{prefix}msg:{message_id}" for message_id in message_ids]
            old += [f"{prefix}file:{file_id}" for file_id in file_ids]
            pipe.delete(*old)
            await pipe.execute()
        moved += 1
    return moved


def _message(row: dict[str, str]) -> str:
    return json.dumps(
        {
            "id": row["id"],
            "session_id": row["session_id"],
            "role": row["role"],
            "content": row["content"],
            "file_ids": json.loads(row["file_ids"]),
            "interaction_id": row["interaction_id"],
            "created_at": row["created_at"],
        }
    )


def _file(row: dict[str, str]) -> str:
    fields = ("id", "filename", "mime_type", "sha256", "created_at")
    return json.dumps({**{name: row[name] for name in fields}, "size": int(row["size"])})


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("PARLEY_REDIS_URL")
    if not url:
        print("parley: give the Redis URL (or set PARLEY_REDIS_URL)", file=sys.stderr)
        return 2
    from parley.sessions.redis import connect

    async def run() -> int:
        redis = connect(url)
        try:
            return await migrate(redis)
        finally:
            await redis.aclose()

    moved = anyio.run(run)
    print(f"parley: moved {moved} session(s) to the layout with hash tags")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
