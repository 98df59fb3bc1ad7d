-- resize_poll.lua: between two messages of a partition (after message_id.lua, resize_release.lua).
--
-- KEYS[1] resize hash, KEYS[2] drained set, KEYS[3] ids set, KEYS[4] released set,
-- KEYS[5] waiting hash of this partition, KEYS[6] this partition's Redis list (its head is
-- the right end; '' on a broker that cannot push to the head), KEYS[7] the old queue to mark
-- drained when empty ('' for none), KEYS[8] this partition's outbox (when KEYS[6] is '')
-- ARGV[1] prefix of the keys' lists, ARGV[2] the old partition KEYS[7] is
-- Marks the old partition drained if its queue is empty; releases (resize_release.lua) every
-- key held here whose old partition is drained.
-- Returns {1 while the resize is in flight else 0, messages released}; releases nothing
-- while the head of this partition is a message the resize gate stored already.
local resize, drained, ids, released, waiting, queue = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]
if redis.call('HEXISTS', resize, 'from') == 0 then return {0, 0} end
if KEYS[7] ~= '' and redis.call('LLEN', KEYS[7]) == 0 then
  redis.call('SADD', drained, ARGV[2])
end
local count = 0
-- a message stored here already and put back at the head by crash recovery goes first (the
-- gate only acks it): released now, its copy would run again behind the released ones
local head = queue ~= '' and redis.call('LINDEX', queue, -1)
if head and redis.call('SISMEMBER', ids, message_id(head)) == 1 then return {1, 0} end
local entries = redis.call('HGETALL', waiting)
for i = 1, #entries, 2 do
  local digest, old = entries[i], entries[i + 1]
  if redis.call('SISMEMBER', drained, old) == 1 then
    local lists = ARGV[1] .. digest
    count = count + release(digest, lists .. ':moved', lists .. ':held', lists .. ':pending',
                            queue, KEYS[8], waiting, ids, released)
  end
end
return {1, count}
