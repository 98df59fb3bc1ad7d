-- prelude.lua: shared head of the dead-letter and parking scripts (not run on its own).
--
-- KEYS[1] dead letters hash of the pool (key digest -> JSON dead letter; present = parked)
-- KEYS[2] parked list of the key (raw messages set aside, in arrival order)
-- KEYS[3] parked-ids set of the key (task ids stored already: dead letter, parked, deferred)
-- KEYS[4] replaying set of the key (replayed task ids not yet done)
-- KEYS[5] deferred list of the key (newer messages that arrived during a replay)
-- KEYS[6] kombu's Redis list of the partition queue, or '' when re-queueing publishes
--         through the broker (then messages go to KEYS[7])
-- KEYS[7] replay outbox list of the key
-- ARGV[1] key digest (store.keys.key_digest)
local dl, parked, ids, replaying, deferred = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local queue, outbox = KEYS[6], KEYS[7]
local digest = ARGV[1]

local function message_id(m)
  local ok, p = pcall(cjson.decode, m)
  if ok and type(p) == 'table' then
    if type(p.headers) == 'table' and p.headers.id then return tostring(p.headers.id) end
    if type(p.properties) == 'table' and p.properties.correlation_id then
      return tostring(p.properties.correlation_id)
    end
  end
  return ''
end

-- The last replayed message is done: the messages deferred behind the replay go next
-- (to the head of the queue), or behind the parked ones if the key was parked again.
local function drain_deferred()
  if redis.call('SCARD', replaying) > 0 then return end
  local waiting = redis.call('LRANGE', deferred, 0, -1)
  if #waiting == 0 then return end
  redis.call('DEL', deferred)
  if redis.call('HEXISTS', dl, digest) == 1 then
    for i = 1, #waiting do redis.call('RPUSH', parked, waiting[i]) end
  else
    for i = 1, #waiting do
      local mid = message_id(waiting[i])
      redis.call('SREM', ids, mid)
      redis.call('SADD', replaying, mid)
    end
    if queue ~= '' then
      for i = #waiting, 1, -1 do redis.call('RPUSH', queue, waiting[i]) end
    else
      for i = 1, #waiting do redis.call('RPUSH', outbox, waiting[i]) end
    end
  end
end
