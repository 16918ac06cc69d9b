"""Every Lua script parley runs on Redis, named for what it does.

Each one is registered once per client (:class:`Scripts`, redis-py's ``register_script``) and runs by its SHA
(``EVALSHA``; redis-py loads it on the first ``NOSCRIPT``), so a call sends its keys and arguments, not its text.
"""

from __future__ import annotations

from typing import Any

from redis.commands.core import AsyncScript

# The claims of sessions (see sessions.redis_claims).

# Only ever extends the claim: one that is gone is not made again (its owner stops instead). Answers 0 (gone),
# 1 (extended), or the reason of a cancel left for the interaction by a process its owner did not answer.
RENEW_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('GET', KEYS[2]) or 1
"""

# Frees the claim; a reply recorded "cancelled" says so for a while, for a canceller waiting on a silent owner.
# The canceller that stopped the reply through the cancel bus, if one did, hears its answer on its list (KEYS[3]).
RELEASE_CLAIM = """
if ARGV[2] == 'cancelled' then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) end
if KEYS[3] then
  redis.call('RPUSH', KEYS[3], '1')
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The cancel bus (see sessions.redis_cancels).

# Sends a cancel (ARGV[1], JSON) to the process holding the session's claim, naming the interaction it holds, in
# the round trip that reads the claim. Not to this process (ARGV[2]), nor if the claim is another interaction
# than ARGV[3] (when given). Answers nil (no claim), or the claim and how many listeners heard it (-1: not sent).
SEND_CANCEL = """
local claim = redis.call('GET', KEYS[1])
if not claim then return nil end
local process, interaction = string.match(claim, '^(.-):(.*)$')
if process == ARGV[2] or (ARGV[3] ~= '' and ARGV[3] ~= interaction) then return {claim, -1} end
local request = cjson.decode(ARGV[1])
request['interaction'] = interaction
return {claim, redis.call('PUBLISH', ARGV[4] .. process, cjson.encode(request))}
"""

# The store (see sessions.redis).

# Mark a session's "streaming" turns "interrupted", unless an interaction holds the session's claim.
INTERRUPT_ORPHANS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local key = ARGV[1] .. 'msg:' .. id
  if redis.call('HGET', key, 'status') == 'streaming' then
    redis.call('HSET', key, 'status', 'interrupted')
    n = n + 1
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[2])
return n
"""

RECORD_REPLY = """
local session_id = redis.call('HGET', KEYS[1], 'session_id')
if not session_id then return 0 end
redis.call('HSET', KEYS[1], 'content', ARGV[1], 'status', ARGV[2])
local streaming = ARGV[4] .. 'streaming:' .. session_id
redis.call('SREM', streaming, ARGV[3])
if redis.call('SCARD', streaming) == 0 then redis.call('SREM', ARGV[4] .. 'streaming', session_id) end
return 1
"""

CREATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'agent', ARGV[1], 'created_at', ARGV[2], 'owner', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# Returns the ids of the files whose records it removed (nil when there was no such session for this owner).
# A session hash without 'owner' was stored before owners existed: it is the open owner's ('').
DELETE_SESSION = """
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[3] then return false end
if redis.call('DEL', KEYS[1]) == 0 then return false end
local files = redis.call('LRANGE', KEYS[4], 0, -1)
redis.call('ZREM', KEYS[2], ARGV[2])
for _, id in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do redis.call('DEL', ARGV[1] .. 'msg:' .. id) end
for _, id in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do redis.call('DEL', ARGV[1] .. 'file:' .. id) end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[7])
redis.call('SREM', KEYS[6], ARGV[2])
return files
"""

# A file's record, only while its session exists.
ADD_FILE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], unpack(ARGV))
redis.call('RPUSH', KEYS[3], ARGV[2])
return 1
"""

# The text so far of a reply still streaming (a finished one keeps its final text).
CHECKPOINT_REPLY = """
if redis.call('HGET', KEYS[1], 'status') ~= 'streaming' then return 0 end
redis.call('HSET', KEYS[1], 'content', ARGV[1])
return 1
"""

DELETE_FILE = """
if redis.call('HGET', KEYS[1], 'session_id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[2], 0, ARGV[2])
return 1
"""

# The streams per owner (see sessions.redis_limits). The clock is Redis's own, so hosts agree on when a lease ends.

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] the owner's slots; ARGV: interaction id, limit, lease (ms).
TAKE_SLOT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: the owners' slots, ARGV[1] the lease (ms), then each key's interaction id; a slot already gone
# (its lease ran out while Redis was unreachable) is not taken again: XX.
RENEW_SLOTS = (
    _NOW
    + """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""
)


class Scripts:
    """The scripts registered on one client: ``await scripts.renew_claim(keys, args)`` (or ``client=`` a
    pipeline of it)."""

    def __init__(self, redis: Any) -> None:
        register = redis.register_script
        self.renew_claim: AsyncScript = register(RENEW_CLAIM)
        self.release_claim: AsyncScript = register(RELEASE_CLAIM)
        self.send_cancel: AsyncScript = register(SEND_CANCEL)
        self.interrupt_orphans: AsyncScript = register(INTERRUPT_ORPHANS)
        self.record_reply: AsyncScript = register(RECORD_REPLY)
        self.create_session: AsyncScript = register(CREATE_SESSION)
        self.delete_session: AsyncScript = register(DELETE_SESSION)
        self.add_file: AsyncScript = register(ADD_FILE)
        self.checkpoint_reply: AsyncScript = register(CHECKPOINT_REPLY)
        self.delete_file: AsyncScript = register(DELETE_FILE)
        self.take_slot: AsyncScript = register(TAKE_SLOT)
        self.renew_slots: AsyncScript = register(RENEW_SLOTS)
