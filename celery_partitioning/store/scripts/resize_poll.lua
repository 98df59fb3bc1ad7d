-- resize_poll.lua: between two messages of partition ARGV[2] (after message_id.lua).
--
-- KEYS[1] resize hash, KEYS[2] drained set, KEYS[3] ids set, KEYS[4] released set,
-- KEYS[5] waiting hash of this partition, KEYS[6] this partition's Redis list (its head is
-- the right end), KEYS[7] the old queue to mark drained when empty ('' for none)
-- ARGV[1] prefix of the keys' lists, ARGV[2] the old partition KEYS[7] is
-- Marks the old partition drained if its queue is empty; releases every key held here
-- whose old partition is drained: its moved messages, then its held ones, go to the head.
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
local head = redis.call('LINDEX', queue, -1)
if head and redis.call('SISMEMBER', ids, message_id(head)) == 1 then return {1, 0} end
local entries = redis.call('HGETALL', waiting)
for i = 1, #entries, 2 do
  local digest, old = entries[i], entries[i + 1]
  if redis.call('SISMEMBER', drained, old) == 1 then
    local moved_list, held_list = ARGV[1] .. digest .. ':moved', ARGV[1] .. digest .. ':held'
    local going = redis.call('LRANGE', moved_list, 0, -1)
    local newer = redis.call('LRANGE', held_list, 0, -1)
    for j = 1, #newer do going[#going + 1] = newer[j] end
    -- the head is the right end: push the newest first, the oldest moved message last
    for j = #going, 1, -1 do
      redis.call('RPUSH', queue, going[j])
      local mid = message_id(going[j])
      redis.call('SREM', ids, mid)
      redis.call('SADD', released, mid)
    end
    redis.call('DEL', moved_list, held_list)
    redis.call('HDEL', waiting, digest)
    count = count + #going
  end
end
return {1, count}
