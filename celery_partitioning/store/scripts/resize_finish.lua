-- resize_finish.lua: end the resize once every old partition is drained and no key waits.
--
-- KEYS[1] resize hash, KEYS[2] drained set, KEYS[3] ids set, KEYS[4] released set,
-- KEYS[5..] the waiting hash of every partition of the new size
-- ARGV[1] the old size, ARGV[2] now (ISO text)
-- Returns 1 when no resize is in flight (any more), else 0.
if redis.call('HEXISTS', KEYS[1], 'from') == 0 then return 1 end
if redis.call('HGET', KEYS[1], 'from') ~= ARGV[1] then return 0 end
if redis.call('SCARD', KEYS[2]) < tonumber(ARGV[1]) then return 0 end
for i = 5, #KEYS do
  if redis.call('HLEN', KEYS[i]) > 0 then return 0 end
end
redis.call('HDEL', KEYS[1], 'from', 'started')
redis.call('HSET', KEYS[1], 'finished', ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return 1
