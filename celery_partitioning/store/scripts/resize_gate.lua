-- resize_gate.lua: a message of a key that moved, received during a resize (after
-- message_id.lua and resize_release.lua).
--
-- KEYS[1] resize hash, KEYS[2] drained set, KEYS[3] ids set, KEYS[4] released set,
-- KEYS[5] waiting hash of the key's NEW partition, KEYS[6] the key's moved list,
-- KEYS[7] the key's held list, KEYS[8] the key's pending set and KEYS[9] the new partition's
-- outbox (a broker that cannot push to the head; else both '')
-- ARGV[1] key digest, ARGV[2] task id, ARGV[3] raw message,
-- ARGV[4] 'old' (stamped with the old size: move it to the new partition),
--         'new' (stamped with the new size, received on the key's new partition),
--         'unplaced' (stamped with a size that is neither: hold it, never run it early)
--         'mark' (any other message, stamped with the new size: run it)
-- ARGV[5] the key's old partition ('-1' for 'unplaced')
-- ARGV[6] this partition, when it is an old one not yet known drained, else '': a message
--         stamped with the new size that was not released here marks it drained (every
--         old-size message was queued ahead of it)
-- Returns 'over' (no resize in flight any more), 'released' (released to this partition:
-- run it), 'run', 'moved', 'held' or 'duplicate'.
local resize, drained, ids, released = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local waiting, moved, held = KEYS[5], KEYS[6], KEYS[7]
local digest, id, raw, action, old = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('HEXISTS', resize, 'from') == 0 then return 'over' end
if redis.call('SISMEMBER', released, id) == 1 then
  -- through an outbox: when the last released message is back, what was held meanwhile goes
  if KEYS[8] ~= '' and redis.call('SREM', KEYS[8], id) == 1 and redis.call('SCARD', KEYS[8]) == 0
     and release(digest, moved, held, KEYS[8], '', KEYS[9], waiting, ids, released) == 0 then
    redis.call('HDEL', waiting, digest)
  end
  return 'released'
end
if ARGV[6] ~= '' and (action == 'new' or action == 'mark') then redis.call('SADD', drained, ARGV[6]) end
if action == 'mark' then return 'run' end
if redis.call('SISMEMBER', ids, id) == 1 then return 'duplicate' end
if action == 'old' then
  redis.call('RPUSH', moved, raw)
  redis.call('SADD', ids, id)
  redis.call('HSETNX', waiting, digest, old)
  return 'moved'
end
local waits = redis.call('HEXISTS', waiting, digest) == 1
if action == 'new' and not waits and redis.call('SISMEMBER', drained, old) == 1 then
  return 'run'
end
redis.call('RPUSH', held, raw)
redis.call('SADD', ids, id)
redis.call('HSETNX', waiting, digest, old)
return 'held'
