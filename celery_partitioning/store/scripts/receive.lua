-- receive.lua: record a fetched message as unacked and decide the gate, in one step
-- (Redis broker whose Redis holds the store; prelude + gate first).
--
-- What kombu's Redis QoS.append does (ZADD unacked_index, HSET unacked), plus taking the
-- message off the partition's in-transit list (the loss-free fetch), then the gate.
-- KEYS[1..7] as prelude.lua, KEYS[8] as gate.lua
-- KEYS[9] kombu's unacked_index sorted set, KEYS[10] kombu's unacked hash,
-- KEYS[11] the partition's in-transit list
-- ARGV[1] key digest, ARGV[2] task id, ARGV[3] raw message, ARGV[4] delivery tag,
-- ARGV[5] delivery time, ARGV[6] unacked entry (JSON [payload, exchange, routing key]),
-- ARGV[7] the in-transit item to remove ('' if none)
-- Returns gate()'s reply.
redis.call('ZADD', KEYS[9], ARGV[5], ARGV[4])
redis.call('HSET', KEYS[10], ARGV[4], ARGV[6])
if ARGV[7] ~= '' then redis.call('LREM', KEYS[11], 1, ARGV[7]) end
return gate(ARGV[2], ARGV[3])
