-- lease_renew.lua: extend every lease that is still ours (compare-and-expire), in one call.
--
-- KEYS the leases of one process; ARGV[1] TTL in milliseconds, ARGV[1 + i] our value of KEYS[i]
-- Returns a list: 1 for each lease renewed, 0 for each one gone or someone else's.
local renewed = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    renewed[i] = redis.call('PEXPIRE', key, ARGV[1])
  else
    renewed[i] = 0
  end
end
return renewed
