-- lease_release.lua: delete the lease if it is still ours (compare-and-delete).
--
-- KEYS[1] the lease; ARGV[1] our value
-- Returns 1 when deleted, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
