"""Every Lua script parley runs on Redis, named for what it does.

Every key a script touches is passed in ``KEYS``, and all of a script's keys share one hash tag (see
:mod:`sessions.redis_keys`), so each runs on one slot of a Redis Cluster. (The exception is the owner's stream
slots, which the turn's scripts take and give back only on a single Redis: on a cluster, they live in the owner's
slot and :mod:`sessions.redis_limits` keeps them in round trips of their own.)

Each one is registered once per client (:class:`Scripts`, redis-py's ``register_script``) and runs by its SHA
(``EVALSHA``; redis-py loads it on the first ``NOSCRIPT``), so a call sends its keys and arguments, not its text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import AsyncScript

from parley.sessions.redis_pipe import pipe_of

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Whether a reply still "streaming" is an orphan to record interrupted now. Its entry in the session's leases says
# until when its owner's claim holds ('L<lease ms>:<until>', kept by the claim's renewals). Once that time has
# passed, the first script to see it gives the owner one more lease, counted from then ('G<until>'): an owner that
# lost its claim to an outage but lives records its own reply once Redis is back, before anyone else may conclude
# that it died. A reply with no entry (written without a claim) is an orphan as soon as nobody claims the session.
_ORPHANED = """
local function orphaned(leases, id, now, claimed)
  local entry = redis.call('HGET', leases, id)
  if not entry then return not claimed end
  local lease, till = string.match(entry, '^L(%d+):(%d+)$')
  if lease then
    if now >= tonumber(till) then redis.call('HSET', leases, id, 'G' .. (now + tonumber(lease))) end
    return false
  end
  local grace = string.match(entry, '^G(%d+)$')
  return grace == nil or now >= tonumber(grace)
end

-- Record the session's orphans interrupted and forget every reply no longer streaming; how many were orphans.
local function interrupt_orphans(streaming, statuses, leases, now, claimed)
  local n = 0
  for _, id in ipairs(redis.call('SMEMBERS', streaming)) do
    local live = redis.call('HGET', statuses, id) == 'streaming'
    if not live or orphaned(leases, id, now, claimed) then
      if live then
        redis.call('HSET', statuses, id, 'interrupted')
        n = n + 1
      end
      redis.call('SREM', streaming, id)
      redis.call('HDEL', leases, id)
    end
  end
  return n
end
"""

# The messages that wait for a session (see sessions.redis_queue), live ones only, in the order they run: a hash,
# interaction → '<place> <until> <process> <owner>'. An entry whose until has passed (its process stopped renewing
# it: it died) is dropped as it is met, so that it holds up the others a lease at most.
_LINE = """
local function line(queue, now)
  local flat = redis.call('HGETALL', queue)
  local entries = {}
  for i = 1, #flat, 2 do
    local place, till, process, owner = string.match(flat[i + 1], '^(%-?%d+) (%d+) (%S+) (.*)$')
    if place and now < tonumber(till) then
      entries[#entries + 1] = {flat[i], tonumber(place), process, owner}
    else
      redis.call('HDEL', queue, flat[i])
    end
  end
  table.sort(entries, function(x, y) return x[2] < y[2] end)
  return entries
end
"""

# Whether an interaction may take a free claim, given the session's line (see _LINE): only when no message waits
# for the session, or, for a message that waits ('1'), when it is first in the line (not when a cancel or a delete
# took it out meanwhile).
_MAY_CLAIM = """
local function may_claim(waiting, interaction, waits)
  if waits == '1' then return #waiting > 0 and waiting[1][1] == interaction end
  return #waiting == 0
end
"""

# Frees a claim if it is still ``value``'s. A reply recorded "cancelled" says so for a while, for a canceller
# waiting on a silent owner; the canceller that stopped the reply through the cancel bus, if one did, hears its
# answer on its list; the owner's stream slot, if the script holds it, is given back. Answers the process of the
# message first in the session's line, if one waits (its process is told that it may go: see sessions.redis_queue).
_RELEASE = (
    _LINE
    + """
local function release(claim, cancelled, answer, slots, value, status, cancelled_ms, answer_ttl, interaction,
                       queue, now)
  if status == 'cancelled' then redis.call('SET', cancelled, '1', 'PX', cancelled_ms) end
  if answer then
    redis.call('RPUSH', answer, '1')
    redis.call('EXPIRE', answer, answer_ttl)
  end
  if slots then redis.call('ZREM', slots, interaction) end
  if redis.call('GET', claim) == value then redis.call('DEL', claim) end
  local waiting = line(queue, now)
  if #waiting > 0 then return waiting[1][3] end
  return false
end
"""
)

# A chat's first round trip. KEYS: 1 session, 2 message ids, 3 messages, 4 statuses, 5 streaming, 6 claim,
# 7 leases, 8 the messages that wait for the session, 9 the owner's stream slots (only when the script takes one).
# ARGV: 1 owner, 2 each agent's history limit (JSON), 3-5 the user's message (id, JSON, status), 6-8 the reply's,
# 9 the claim's value ('': no claim), 10 the lease (ms), 11 the interaction, 12 the owner's limit, 13 the start of
# the user's text (the session's title while it has none set, if it is the first), 14 '1' if the interaction waits
# in the session's line. In this order: the owner's limit (an owner at it hears so whatever the session), the
# session and its owner, the claim (free, and see _MAY_CLAIM: claiming takes the interaction out of the line), the
# agent; then, the claim taken, any turn still streaming whose owner is gone (see _ORPHANED) is recorded
# interrupted; then the history is read and both messages written. Answers {'ok', agent, created_at, history as
# JSON, their statuses}, or why not.
BEGIN_TURN = (
    _NOW
    + _ORPHANED
    + _LINE
    + _MAY_CLAIM
    + """
if KEYS[9] then
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
  if redis.call('ZCARD', KEYS[9]) >= tonumber(ARGV[12]) then return {'limit'} end
end
local session = redis.call('HMGET', KEYS[1], 'agent', 'created_at', 'owner')
if not session[1] or (session[3] or '') ~= ARGV[1] then return {'missing'} end
local claiming = ARGV[9] ~= ''
local waiting = {}
if claiming then
  if redis.call('EXISTS', KEYS[6]) == 1 then return {'busy'} end
  waiting = line(KEYS[8], now)
  if not may_claim(waiting, ARGV[11], ARGV[14]) then return {'busy'} end
end
local limit = cjson.decode(ARGV[2])[session[1]]
if not limit then return {'agent', session[1], session[2]} end
if claiming then interrupt_orphans(KEYS[5], KEYS[4], KEYS[7], now, false) end
local messages, statuses = {}, {}
if limit > 0 then
  local ids = redis.call('LRANGE', KEYS[2], -limit, -1)
  if #ids > 0 then
    messages = redis.call('HMGET', KEYS[3], unpack(ids))
    statuses = redis.call('HMGET', KEYS[4], unpack(ids))
  end
end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4], ARGV[6], ARGV[7])
redis.call('HSET', KEYS[4], ARGV[3], ARGV[5], ARGV[6], ARGV[8])
redis.call('RPUSH', KEYS[2], ARGV[3], ARGV[6])
redis.call('SADD', KEYS[5], ARGV[6])
redis.call('HSETNX', KEYS[1], 'first', ARGV[13])
if claiming then
  redis.call('SET', KEYS[6], ARGV[9], 'PX', ARGV[10])
  redis.call('HSET', KEYS[7], ARGV[6], 'L' .. ARGV[10] .. ':' .. (now + tonumber(ARGV[10])))
  if #waiting > 0 then redis.call('HDEL', KEYS[8], ARGV[11]) end
end
if KEYS[9] then
  redis.call('ZADD', KEYS[9], now + tonumber(ARGV[10]), ARGV[11])
  redis.call('PEXPIRE', KEYS[9], ARGV[10])
end
return {'ok', session[1], session[2], messages, statuses}
"""
)

# A chat's last round trip: the reply's final text and status, unless it is no longer "streaming" (its session was
# deleted meanwhile, or another process recorded it interrupted: a final record never changes), and, when ARGV[4]
# names the claim's value, the release (see _RELEASE). KEYS: 1 messages, 2 statuses, 3 streaming, 4 leases,
# 5 claim, 6 cancelled, 7 the messages that wait for the session, then the cancel's answer list if ARGV[8] is '1',
# then the owner's slots if ARGV[9] is '1'. ARGV: 1 reply id, 2 reply JSON, 3 status, 4 claim value,
# 5 cancelled (ms), 6 answer TTL (s), 7 interaction. Answers what the release answers (false without one).
END_TURN = (
    _NOW
    + _RELEASE
    + """
if redis.call('HGET', KEYS[2], ARGV[1]) == 'streaming' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if ARGV[4] ~= '' then
  local answer, slots = nil, nil
  local k = 8
  if ARGV[8] == '1' then answer = KEYS[k]; k = k + 1 end
  if ARGV[9] == '1' then slots = KEYS[k] end
  return release(KEYS[5], KEYS[6], answer, slots, ARGV[4], ARGV[3], ARGV[5], ARGV[6], ARGV[7], KEYS[7], now)
end
return false
"""
)

# The text so far of replies still streaming (a finished one keeps its final text). KEYS: 1 messages,
# 2 statuses; ARGV: message id, JSON, message id, JSON, ...
CHECKPOINT_REPLIES = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == 'streaming' then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    n = n + 1
  end
end
return n
"""

# Mark a session's orphaned "streaming" turns "interrupted" (see _ORPHANED). KEYS: 1 claim, 2 streaming,
# 3 statuses, 4 leases.
INTERRUPT_ORPHANS = (
    _NOW
    + _ORPHANED
    + """
return interrupt_orphans(KEYS[2], KEYS[3], KEYS[4], now, redis.call('EXISTS', KEYS[1]) == 1)
"""
)

# A session's messages in order. KEYS: 1 message ids, 2 messages, 3 statuses; ARGV[1] the first (from the end if
# negative). Answers {messages as JSON, their statuses}.
READ_MESSAGES = """
local ids = redis.call('LRANGE', KEYS[1], ARGV[1], -1)
if #ids == 0 then return {{}, {}} end
return {redis.call('HMGET', KEYS[2], unpack(ids)), redis.call('HMGET', KEYS[3], unpack(ids))}
"""

# KEYS: 1 session; ARGV: agent, created_at, owner, title ('' for none).
CREATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'agent', ARGV[1], 'created_at', ARGV[2], 'owner', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'title', ARGV[4]) end
return 1
"""

# A session's title, if the session is the owner's. KEYS: 1 session; ARGV: 1 owner, 2 title ('': none, so that the
# first user message's is shown). Answers 1, or 0 when the owner has no such session.
SET_TITLE = """
local session = redis.call('HMGET', KEYS[1], 'agent', 'owner')
if not session[1] or (session[2] or '') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], 'title') else redis.call('HSET', KEYS[1], 'title', ARGV[2]) end
return 1
"""

# A turn in the place of the session's message ARGV[2] (as the API names it: its client_id, or its id when it has
# none), with the claim already taken (see Store.replace_turn). KEYS: 1 session, 2 message ids, 3 messages,
# 4 statuses, 5 streaming, 6 leases (a turn still streaming whose owner is gone is recorded interrupted, see
# _ORPHANED). ARGV: 1 owner, 2 target, 3 '1' when a missing target makes it a plain turn, 4 'keep' (a
# user message named stays, as for a reply), else whether the user's text is not empty ('1' or '0'), 5 each agent's
# history limit (JSON), 6-8 the user's message (id, JSON, status), 9-11 the reply's, 12 the start of the user's
# text (the title's). Client ids are letters, digits, '_' and '-' (see parley.forms): found in the JSON as they
# are, with no decoding. Answers {'ok', agent, created_at, the kept user message's JSON and status (or ''),
# history as JSON, their statuses}, or why not.
REPLACE_TURN = (
    _NOW
    + _ORPHANED
    + """
local session = redis.call('HMGET', KEYS[1], 'agent', 'created_at', 'owner')
if not session[1] or (session[3] or '') ~= ARGV[1] then return {'missing'} end
local limit = cjson.decode(ARGV[5])[session[1]]
if not limit then return {'agent', session[1], session[2]} end
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
local named = '"client_id": "' .. ARGV[2] .. '"'
local at, row = nil, nil
for i = #ids, 1, -1 do
  local found = redis.call('HGET', KEYS[3], ids[i])
  if found and (string.find(found, named, 1, true) or
      (ids[i] == ARGV[2] and not string.find(found, '"client_id": "[^"]')))
  then at, row = i, found; break end
end
local start, kept = #ids + 1, nil
if at == nil then
  if ARGV[3] ~= '1' then return {'not_found'} end
else
  start = at
  local role = cjson.decode(row)['role']
  if role == 'assistant' then
    local j = at - 1
    while j >= 1 and cjson.decode(redis.call('HGET', KEYS[3], ids[j]) or '{}')['role'] ~= 'user' do j = j - 1 end
    if j < 1 then return {'not_found'} end
    start, kept = j, ids[j]
  elseif ARGV[4] == 'keep' then
    start, kept, at = at, ids[at], at + 1
  elseif ARGV[4] ~= '1' then
    return {'needs_text'}
  end
end
interrupt_orphans(KEYS[5], KEYS[4], KEYS[6], now, false)
local kept_row, kept_status = '', ''
if kept then kept_row, kept_status = redis.call('HGET', KEYS[3], kept), redis.call('HGET', KEYS[4], kept) end
local messages, statuses = {}, {}
if limit > 0 and start > 1 then
  local earlier = {}
  for k = math.max(1, start - limit), start - 1 do earlier[#earlier + 1] = ids[k] end
  messages = redis.call('HMGET', KEYS[3], unpack(earlier))
  statuses = redis.call('HMGET', KEYS[4], unpack(earlier))
end
if at ~= nil and at <= #ids then
  for k = at, #ids do
    redis.call('HDEL', KEYS[3], ids[k])
    redis.call('HDEL', KEYS[4], ids[k])
  end
  if at == 1 then redis.call('DEL', KEYS[2]) else redis.call('LTRIM', KEYS[2], 0, at - 2) end
end
if not kept then
  redis.call('HSET', KEYS[3], ARGV[6], ARGV[7])
  redis.call('HSET', KEYS[4], ARGV[6], ARGV[8])
  redis.call('RPUSH', KEYS[2], ARGV[6])
  if start == 1 then redis.call('HSET', KEYS[1], 'first', ARGV[12])
  else redis.call('HSETNX', KEYS[1], 'first', ARGV[12]) end
end
redis.call('HSET', KEYS[3], ARGV[9], ARGV[10])
redis.call('HSET', KEYS[4], ARGV[9], ARGV[11])
redis.call('RPUSH', KEYS[2], ARGV[9])
redis.call('SADD', KEYS[5], ARGV[9])
return {'ok', session[1], session[2], kept_row, kept_status or '', messages, statuses}
"""
)

# Deletes the owner's session with its history, its files' records and its claim (an owner that did not answer
# the cancel, dead or silent, finds its claim gone at its next renewal, and stops). KEYS: 1 session, 2 message ids,
# 3 messages, 4 statuses, 5 streaming, 6 file ids, 7 files, 8 claim, 9 leases, 10 the messages that wait for it;
# ARGV[1] the owner. Answers the ids of the files whose records it removed, or nil when the owner has no such session.
DELETE_SESSION = """
if (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[1] then return false end
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local files = redis.call('LRANGE', KEYS[6], 0, -1)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10])
return files
"""

# A file's record, only while its session exists. KEYS: 1 session, 2 file ids, 3 files; ARGV: id, JSON.
ADD_FILE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

# KEYS: 1 file ids, 2 files. Answers the records in order.
READ_FILES = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
"""

# KEYS: 1 file ids, 2 files; ARGV[1] the file.
DELETE_FILE = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('LREM', KEYS[1], 0, ARGV[1])
return 1
"""

# The claims of sessions (see sessions.redis_claims).

# Claims a session for a store other than Redis's: the owner's stream slot first, when KEYS[3] names it (as in
# BEGIN_TURN), then the claim (as in BEGIN_TURN: see _MAY_CLAIM). KEYS: 1 claim, 2 the messages that wait for the
# session, 3 the owner's slots. ARGV: 1 value, 2 lease (ms), 3 interaction, 4 the owner's limit, 5 '1' if the
# interaction waits in the session's line. Answers 'ok', 'limit' or 'busy'.
CLAIM_SESSION = (
    _NOW
    + _LINE
    + _MAY_CLAIM
    + """
if KEYS[3] then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return 'limit' end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'busy' end
local waiting = line(KEYS[2], now)
if not may_claim(waiting, ARGV[3], ARGV[5]) then return 'busy' end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if #waiting > 0 then redis.call('HDEL', KEYS[2], ARGV[3]) end
if KEYS[3] then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return 'ok'
"""
)

# Only ever extends the claim: one that is gone is not made again (its owner stops instead); with it, the reply's
# entry in the session's leases (see _ORPHANED), if it has one. KEYS: 1 claim, 2 a cancel left for the interaction,
# 3 leases. ARGV: 1 value, 2 lease (ms), 3 the reply ('' if not known yet). Answers 0 (gone), 1 (extended), or the
# reason of a cancel left for the interaction by a process its owner did not answer.
RENEW_CLAIM = (
    _NOW
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[3], 'L' .. ARGV[2] .. ':' .. (now + tonumber(ARGV[2])))
end
return redis.call('GET', KEYS[2]) or 1
"""
)

# A cancel's first look: the session's claim, and its owner when the Redis store keeps the session (so that another
# owner's cancel is answered without asking the process streaming it: as fast as for a session that streams
# nowhere); and a cancel of a message that waits in the session's line (ARGV[1], for the owner ARGV[2] when ARGV[3]
# is '1') takes it out of the line. KEYS: 1 claim, 2 session, 3 the messages that wait for it. Answers {claim or
# false, owner or false, the process of the message taken out of the line or false, the process to tell that its
# message is now first in the line, with the claim free, or false}.
CLAIM_AND_OWNER = (
    _NOW
    + _LINE
    + """
local claim, owner = redis.call('GET', KEYS[1]), redis.call('HGET', KEYS[2], 'owner')
local dequeued, first = false, false
if ARGV[1] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  local waiting = line(KEYS[3], now)
  for i, entry in ipairs(waiting) do
    if entry[1] == ARGV[1] and (ARGV[3] ~= '1' or entry[4] == ARGV[2]) then
      redis.call('HDEL', KEYS[3], ARGV[1])
      dequeued = entry[3]
      if i == 1 and #waiting > 1 and not claim then first = waiting[2][3] end
    end
  end
end
return {claim, owner, dequeued, first}
"""
)

# See _RELEASE (and what it answers). KEYS: 1 claim, 2 cancelled, 3 the messages that wait for the session, then the
# answer list if ARGV[6] is '1', then the owner's slots if ARGV[7] is '1'. ARGV: 1 value, 2 status, 3 cancelled
# (ms), 4 answer TTL (s), 5 interaction.
RELEASE_CLAIM = (
    _NOW
    + _RELEASE
    + """
local answer, slots = nil, nil
local k = 4
if ARGV[6] == '1' then answer = KEYS[k]; k = k + 1 end
if ARGV[7] == '1' then slots = KEYS[k] end
return release(KEYS[1], KEYS[2], answer, slots, ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], KEYS[3], now)
"""
)

# The line of messages that wait for a session (see sessions.redis_queue and _LINE). KEYS[1]: the line; ARGV:
# 1 interaction, 2 its process, 3 its owner, 4 lease (ms), 5 '1' to go first (an interrupt), 6 how many may wait
# (0: no limit). Answers its place, or false when the line is full.
ENQUEUE = (
    _NOW
    + _LINE
    + """
local waiting = line(KEYS[1], now)
local limit = tonumber(ARGV[6])
if limit > 0 and #waiting >= limit then return false end
local place = 0
if #waiting > 0 then
  if ARGV[5] == '1' then place = waiting[1][2] - 1 else place = waiting[#waiting][2] + 1 end
end
redis.call('HSET', KEYS[1], ARGV[1], place .. ' ' .. (now + tonumber(ARGV[4])) .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return place
"""
)

# A waiting message's lease, extended (its process lives). KEYS[1]: the line; ARGV: 1 interaction, 2 lease (ms).
# Answers 0 if it is no longer in the line (taken out by a cancel or a delete, or run out), else 1.
RENEW_WAITING = (
    _NOW
    + """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 0 end
local place, rest = string.match(entry, '^(%-?%d+) %d+ (.*)$')
redis.call('HSET', KEYS[1], ARGV[1], place .. ' ' .. (now + tonumber(ARGV[2])) .. ' ' .. rest)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# A waiting message leaves the line without running. KEYS: 1 the line, 2 the claim; ARGV[1] the interaction.
# Answers the process of the message first in the line after it, if it was first and the claim is free, or false.
DEQUEUE = (
    _NOW
    + _LINE
    + """
local waiting = line(KEYS[1], now)
redis.call('HDEL', KEYS[1], ARGV[1])
if #waiting > 1 and waiting[1][1] == ARGV[1] and redis.call('EXISTS', KEYS[2]) == 0 then return waiting[2][3] end
return false
"""
)

# KEYS[1]: the line. Answers the interactions that wait, in the order they run.
READ_LINE = (
    _NOW
    + _LINE
    + """
local ids = {}
for i, entry in ipairs(line(KEYS[1], now)) do ids[i] = entry[1] end
return ids
"""
)

# Empties the line (its session is deleted). KEYS[1]: the line. Answers the processes whose messages waited.
DROP_LINE = (
    _NOW
    + _LINE
    + """
local seen, processes = {}, {}
for _, entry in ipairs(line(KEYS[1], now)) do
  if not seen[entry[3]] then
    seen[entry[3]] = true
    processes[#processes + 1] = entry[3]
  end
end
redis.call('DEL', KEYS[1])
return processes
"""
)

# The streams per owner (see sessions.redis_limits). The clock is Redis's own, so hosts agree on when a lease ends.

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

# KEYS: one owner's slots; ARGV[1] the lease (ms), then the interactions holding them. A slot already gone (its
# lease ran out while Redis was unreachable) is not taken again: XX.
RENEW_SLOTS = (
    _NOW
    + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""
)


class Scripts:
    """The scripts registered on one client: ``await scripts.renew_claim(keys, args)`` (or ``client=`` a
    pipeline of it); a chat's own (its first and last round trips) through :meth:`run`."""

    def __init__(self, redis: Any) -> None:
        self.pipe = pipe_of(redis)
        register = redis.register_script
        self.begin_turn: AsyncScript = register(BEGIN_TURN)
        self.end_turn: AsyncScript = register(END_TURN)
        self.checkpoint_replies: AsyncScript = register(CHECKPOINT_REPLIES)
        self.interrupt_orphans: AsyncScript = register(INTERRUPT_ORPHANS)
        self.read_messages: AsyncScript = register(READ_MESSAGES)
        self.create_session: AsyncScript = register(CREATE_SESSION)
        self.set_title: AsyncScript = register(SET_TITLE)
        self.replace_turn: AsyncScript = register(REPLACE_TURN)
        self.delete_session: AsyncScript = register(DELETE_SESSION)
        self.add_file: AsyncScript = register(ADD_FILE)
        self.read_files: AsyncScript = register(READ_FILES)
        self.delete_file: AsyncScript = register(DELETE_FILE)
        self.claim_session: AsyncScript = register(CLAIM_SESSION)
        self.renew_claim: AsyncScript = register(RENEW_CLAIM)
        self.release_claim: AsyncScript = register(RELEASE_CLAIM)
        self.claim_and_owner: AsyncScript = register(CLAIM_AND_OWNER)
        self.enqueue: AsyncScript = register(ENQUEUE)
        self.renew_waiting: AsyncScript = register(RENEW_WAITING)
        self.dequeue: AsyncScript = register(DEQUEUE)
        self.read_line: AsyncScript = register(READ_LINE)
        self.drop_line: AsyncScript = register(DROP_LINE)
        self.take_slot: AsyncScript = register(TAKE_SLOT)
        self.renew_slots: AsyncScript = register(RENEW_SLOTS)

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """``script``'s reply, pipelined on the connection that every chat in flight shares (see
        :mod:`sessions.redis_pipe`), or through redis-py where that pipe does not speak for the client."""
        pipe = self.pipe
        if pipe is None or pipe.closed:
            return await script(keys, args)
        return await pipe.script(script, keys, args)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
