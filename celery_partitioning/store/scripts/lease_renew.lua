-- lease_renew.lua: extend the lease if it is still ours (compare-and-expire).
--
-- KEYS[1] the lease; ARGV[1] our value, ARGV[2] TTL in milliseconds
-- Returns 1 when renewed, 0 when the lease is gone or someone else's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
