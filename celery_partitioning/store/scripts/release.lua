-- release.lua: a key's retry backoff is over: its set-aside messages go back, in order, as a
-- replay does (the retried message first, ahead of anything newer of the key); prelude first.
--
-- KEYS[1..9] as prelude.lua, KEYS[10] the partition's backoff schedule (sorted set)
-- ARGV[1] key digest, ARGV[2] the key's member of the schedule, ARGV[3] now (epoch s)
-- Returns the number of messages re-queued, or -1 when the key is not due (or gone), -2 when
-- an earlier replay of the key is still arriving (due again in 0.25 s), -3 when the messages
-- are in the outbox already (KEYS[6] = ''): the caller publishes them, then drops the member.
-- With an outbox the member stays until then, so a crash in between loses nothing.
local schedule, member, now = KEYS[10], ARGV[2], tonumber(ARGV[3])
local due = redis.call('ZSCORE', schedule, member)
if not due or tonumber(due) > now then return -1 end
if redis.call('EXISTS', backoff) == 0 then
  if queue == '' then return -3 end
  redis.call('ZREM', schedule, member)
  return -1
end
if redis.call('SCARD', replaying) > 0 then
  redis.call('ZADD', schedule, now + 0.25, member)
  return -2
end
redis.call('DEL', backoff)
-- a dead letter parked the key meanwhile (a malformed message of it), or an operator paused
-- it: all stay set aside
if redis.call('HEXISTS', dl, digest) == 1 or is_paused() then
  redis.call('ZREM', schedule, member)
  return 0
end
local waiting = redis.call('LRANGE', parked, 0, -1)
redis.call('DEL', parked)
requeue(waiting)
if queue == '' then return -3 end
redis.call('ZREM', schedule, member)
return #waiting
