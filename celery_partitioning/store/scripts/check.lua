-- check.lua: decide whether a received message runs or is set aside (prelude + gate first).
--
-- KEYS[1..9] as prelude.lua, KEYS[10] as gate.lua
-- ARGV[1] key digest, ARGV[2] task id, ARGV[3] raw message (JSON kombu payload)
-- Returns gate()'s reply.
return gate(ARGV[2], ARGV[3])
