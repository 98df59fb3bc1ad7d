"""Lua scripts of the dead-letter store and the parking gate, each run atomically in Redis.

Key names come from :class:`~celery_partitioning.redis_keys.RedisKeys` through ``KEYS``;
:mod:`celery_partitioning.deadletters` is the only caller.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEAD_LETTER_LUA", "FINISHED_LUA", "GATE_LUA", "RECEIVE_LUA"]

# Shared by the scripts below. KEYS: dead letters hash, parked list, parked ids, replaying set,
# deferred list, broker queue list ('' when re-queueing publishes through the broker),
# replay outbox. ARGV[1]: key digest.
_LUA_PRELUDE: Final = r"""
local dl, parked, ids, replaying, deferred = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local queue, outbox = KEYS[6], KEYS[7]
local digest = ARGV[1]

local function message_id(m)
  local ok, p = pcall(cjson.decode, m)
  if ok and type(p) == 'table' then
    if type(p.headers) == 'table' and p.headers.id then return tostring(p.headers.id) end
    if type(p.properties) == 'table' and p.properties.correlation_id then
      return tostring(p.properties.correlation_id)
    end
  end
  return ''
end

-- The last replayed message is done: the messages deferred behind the replay go next
-- (to the head of the queue), or behind the parked ones if the key was parked again.
local function drain_deferred()
  if redis.call('SCARD', replaying) > 0 then return end
  local waiting = redis.call('LRANGE', deferred, 0, -1)
  if #waiting == 0 then return end
  redis.call('DEL', deferred)
  if redis.call('HEXISTS', dl, digest) == 1 then
    for i = 1, #waiting do redis.call('RPUSH', parked, waiting[i]) end
  else
    for i = 1, #waiting do
      local mid = message_id(waiting[i])
      redis.call('SREM', ids, mid)
      redis.call('SADD', replaying, mid)
    end
    if queue ~= '' then
      for i = #waiting, 1, -1 do redis.call('RPUSH', queue, waiting[i]) end
    else
      for i = 1, #waiting do redis.call('RPUSH', outbox, waiting[i]) end
    end
  end
end
"""

# The gate, as a function of the scripts below. KEYS[8]: the task id's in-place retry record.
# Returns {verdict, attempt record ('' if none; read only for 'run'), 1 if the message belongs
# to a replay in flight (its end must be reported: ``finished``) else 0}.
# ``replaying`` holds the replayed messages until they are done (not merely received), so
# one that comes back after a crash is still recognized as older than the deferred ones.
_GATE_FUNCTION: Final = r"""
local attempts = KEYS[8]

local function gate(id, raw)
  -- the happy path: nothing replayed, stored or parked for the key (what the checks below
  -- would conclude from these very keys, in two commands)
  if redis.call('EXISTS', replaying, ids) == 0 and redis.call('HEXISTS', dl, digest) == 0 then
    return {'run', redis.call('GET', attempts) or '', 0}
  end
  if redis.call('SISMEMBER', replaying, id) == 1 then
    if redis.call('HEXISTS', dl, digest) == 0 then
      return {'run', redis.call('GET', attempts) or '', 1}
    end
    -- the replay's dead letter failed again: the rest of the replay is parked again, in order
    redis.call('SREM', replaying, id)
    if redis.call('SADD', ids, id) == 1 then redis.call('RPUSH', parked, raw) end
    drain_deferred()
    return {'parked', '', 0}
  end
  if redis.call('SISMEMBER', ids, id) == 1 then return {'duplicate', '', 0} end
  if redis.call('SCARD', replaying) > 0 then
    redis.call('SADD', ids, id)
    redis.call('RPUSH', deferred, raw)
    return {'deferred', '', 0}
  end
  if redis.call('HEXISTS', dl, digest) == 1 then
    redis.call('SADD', ids, id)
    redis.call('RPUSH', parked, raw)
    return {'parked', '', 0}
  end
  return {'run', redis.call('GET', attempts) or '', 0}
end
"""

# ARGV: key digest, task id, raw payload.
GATE_LUA: Final = _LUA_PRELUDE + _GATE_FUNCTION + r"""
return gate(ARGV[2], ARGV[3])
"""

# Receive and gate in one step (Redis broker on the store's Redis): what kombu's
# ``QoS.append`` does (plus taking the message off the in-transit list, ``worker/fetch.py``),
# then the gate. KEYS[9..11]: kombu's unacked index and hash, the in-transit list.
# ARGV: key digest, task id, raw payload, delivery tag, delivery time, unacked entry,
# in-transit item ('' if none).
RECEIVE_LUA: Final = _LUA_PRELUDE + _GATE_FUNCTION + r"""
redis.call('ZADD', KEYS[9], ARGV[5], ARGV[4])
redis.call('HSET', KEYS[10], ARGV[4], ARGV[6])
if ARGV[7] ~= '' then redis.call('LREM', KEYS[11], 1, ARGV[7]) end
return gate(ARGV[2], ARGV[3])
"""

# A message that ran is done (succeeded or failed for good). ARGV: key digest, task id.
FINISHED_LUA: Final = _LUA_PRELUDE + r"""
if redis.call('SREM', replaying, ARGV[2]) == 1 then drain_deferred() end
return 0
"""

# Record a dead letter and park its key. ARGV: key digest, task id, record JSON, raw payload
# ('' if unknown). Returns 1 if the key got parked now, 0 if it was parked already.
DEAD_LETTER_LUA: Final = _LUA_PRELUDE + r"""
local id, record, raw = ARGV[2], ARGV[3], ARGV[4]
local stored = 0
if redis.call('HEXISTS', dl, digest) == 1 then
  -- already parked (a second consumer after a pool resize): keep the message, in order
  if raw ~= '' and redis.call('SADD', ids, id) == 1 then redis.call('RPUSH', parked, raw) end
else
  redis.call('HSET', dl, digest, record)
  redis.call('SADD', ids, id)
  stored = 1
end
if redis.call('SREM', replaying, id) == 1 then drain_deferred() end
return stored
"""
