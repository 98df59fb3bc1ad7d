-- resize_begin.lua: a worker (or the resize command) starts with pool size ARGV[1].
--
-- KEYS[1] the pool's resize hash (size, from, started), KEYS[2] its drained set
-- ARGV[1] the size this process runs with, ARGV[2] now (ISO text), ARGV[3] 'record' (the
-- resize command: record a resize to ARGV[1]), 'claim' (the first worker of a pool records its
-- size when none is recorded, never a resize) or 'check' (a worker starting: records nothing)
-- Returns {outcome, recorded size, size resized from ('' if none)}; outcomes:
--   'none'     (check) nothing is recorded: no resize was ever recorded for the pool
--   'new'      (record, claim) nothing was recorded: the size is recorded now, no resize
--   'same'     the recorded size (a resize to it may be in flight)
--   'started'  the recorded size differed and no resize was in flight: resize recorded now
--   'conflict' the recorded size differs and a resize is in flight: refuse
--   'mismatch' (check, claim) the recorded size differs: this worker runs with a stale setting
local size = redis.call('HGET', KEYS[1], 'size')
local from = redis.call('HGET', KEYS[1], 'from')
if not size then
  if ARGV[3] == 'check' then return {'none', ARGV[1], ''} end
  redis.call('HSET', KEYS[1], 'size', ARGV[1])
  return {'new', ARGV[1], ''}
end
if size == ARGV[1] then return {'same', size, from or ''} end
if from then return {'conflict', size, from} end
if ARGV[3] ~= 'record' then return {'mismatch', size, ''} end
redis.call('HSET', KEYS[1], 'size', ARGV[1], 'from', size, 'started', ARGV[2])
redis.call('HDEL', KEYS[1], 'finished')
redis.call('DEL', KEYS[2])
return {'started', ARGV[1], size}
