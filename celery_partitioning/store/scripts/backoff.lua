-- backoff.lua: a message retries after a backoff: set its key aside until it is due; prelude
-- first.
--
-- KEYS[1..9] as prelude.lua, KEYS[10] the partition's backoff schedule (sorted set),
-- KEYS[11] the partition's in-transit list when the message was fetched from this Redis, else '',
-- KEYS[12] the task id's attempt record
-- ARGV[1] key digest, ARGV[2] task id, ARGV[3] raw message (the copy to set aside),
-- ARGV[4] due time (epoch s), ARGV[5] the key's member of the schedule, ARGV[6] the message
-- as it sits in KEYS[11], ARGV[7] the attempt record (JSON, naming the copy's token),
-- ARGV[8] its TTL (s). The key's backoff marker holds the retried task id (the due time is
-- the schedule's score).
-- The copy becomes the first set-aside message of the key (later ones go behind it, as for a
-- parked key); idempotent by task id. The delivery that ran is acked here when it came from
-- this Redis: a crash before Celery's own ack cannot bring it back beside the copy.
-- Returns 1.
local schedule, id, raw = KEYS[10], ARGV[2], ARGV[3]
if KEYS[11] ~= '' then redis.call('LREM', KEYS[11], 1, ARGV[6]) end
redis.call('SET', KEYS[12], ARGV[7], 'EX', ARGV[8])
if redis.call('SADD', ids, id) == 1 then redis.call('LPUSH', parked, raw) end
redis.call('SET', backoff, id)
redis.call('ZADD', schedule, ARGV[4], ARGV[5])
-- it was a replayed message: what was deferred behind the replay now waits behind it
if redis.call('SREM', replaying, id) == 1 then drain_deferred() end
return 1
