-- backoff.lua: a message retries after a backoff: set its key aside until it is due; prelude
-- first.
--
-- KEYS[1..8] as prelude.lua, KEYS[9] the partition's backoff schedule (sorted set)
-- ARGV[1] key digest, ARGV[2] task id, ARGV[3] raw message, ARGV[4] due time (epoch s),
-- ARGV[5] the key's member of the schedule, ARGV[6] the backoff marker (JSON)
-- The message becomes the first set-aside message of the key (later ones go behind it, as
-- for a parked key); idempotent by task id. Returns 1.
local schedule, id, raw = KEYS[9], ARGV[2], ARGV[3]
if redis.call('SADD', ids, id) == 1 then redis.call('LPUSH', parked, raw) end
redis.call('SET', backoff, ARGV[6])
redis.call('ZADD', schedule, ARGV[4], ARGV[5])
-- it was a replayed message: what was deferred behind the replay now waits behind it
if redis.call('SREM', replaying, id) == 1 then drain_deferred() end
return 1
