-- resize_take.lua: move the head of an old partition that has no partition of the new size
-- (a shrink) to the moved list of its key, if it is still the head.
--
-- KEYS[1] the old queue's Redis list, KEYS[2] ids set, KEYS[3] waiting hash of the key's
-- new partition, KEYS[4] the key's moved list, KEYS[5] drained set
-- ARGV[1] the raw head as read ('' when the queue looked empty), ARGV[2] its task id,
-- ARGV[3] key digest, ARGV[4] the old partition
-- Returns 1 when moved, 2 when the queue is empty (the old partition is drained now), 0 when
-- the head changed meanwhile (read it again).
if ARGV[1] == '' then
  if redis.call('LLEN', KEYS[1]) > 0 then return 0 end
  redis.call('SADD', KEYS[5], ARGV[4])
  return 2
end
if redis.call('LINDEX', KEYS[1], -1) ~= ARGV[1] then return 0 end
redis.call('RPOP', KEYS[1])
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then redis.call('RPUSH', KEYS[4], ARGV[1]) end
redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[4])
return 1
