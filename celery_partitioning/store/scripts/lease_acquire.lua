-- lease_acquire.lua: take a partition's lease if it is free, ours, or held by a token we
-- may take over (the supervisor saw that holder die).
--
-- KEYS[1] the lease (string "token|host|pid|node")
-- ARGV[1] our value, ARGV[2] TTL in milliseconds, ARGV[3] takeover token ('' for none)
-- Returns 1 when the lease is ours, 0 otherwise.
local current = redis.call('GET', KEYS[1])
if (not current) or current == ARGV[1]
   or (ARGV[3] ~= '' and string.sub(current, 1, string.len(ARGV[3]) + 1) == ARGV[3] .. '|') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
