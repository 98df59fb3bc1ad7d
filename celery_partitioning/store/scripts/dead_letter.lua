-- dead_letter.lua: record a dead letter and park its key; prelude first.
--
-- KEYS[1..9] as prelude.lua
-- ARGV[1] key digest, ARGV[2] task id, ARGV[3] dead letter record (JSON),
-- ARGV[4] raw message ('' if unknown)
-- Returns 1 if the key got parked now, 0 if it was parked already (the message is then
-- kept behind the parked ones, in order).
local id, record, raw = ARGV[2], ARGV[3], ARGV[4]
local stored = 0
if redis.call('HEXISTS', dl, digest) == 1 then
  if raw ~= '' and redis.call('SADD', ids, id) == 1 then redis.call('RPUSH', parked, raw) end
else
  redis.call('HSET', dl, digest, record)
  redis.call('SADD', ids, id)
  stored = 1
end
if redis.call('SREM', replaying, id) == 1 then drain_deferred() end
return stored
