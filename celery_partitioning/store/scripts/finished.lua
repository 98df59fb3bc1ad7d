-- finished.lua: a message that ran is done (succeeded or failed for good); prelude first.
--
-- KEYS[1..9] as prelude.lua
-- ARGV[1] key digest, ARGV[2] task id
-- If it was the last message of a replay, the deferred messages of the key go next.
if redis.call('SREM', replaying, ARGV[2]) == 1 then drain_deferred() end
return 0
