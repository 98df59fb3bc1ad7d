-- prelude.lua: shared head of the dead-letter, parking and backoff scripts (not run on its own;
-- message_id.lua comes before it).
--
-- KEYS[1] dead letters hash of the pool (key digest -> JSON dead letter; present = parked)
-- KEYS[2] parked list of the key (raw messages set aside, in arrival order)
-- KEYS[3] parked-ids set of the key (task ids stored already: dead letter, parked, deferred)
-- KEYS[4] replaying set of the key (replayed task ids not yet done)
-- KEYS[5] deferred list of the key (newer messages that arrived during a replay)
-- KEYS[6] kombu's Redis list of the partition queue, or '' when re-queueing publishes
--         through the broker (then messages go to KEYS[7])
-- KEYS[7] replay outbox list of the key
-- KEYS[8] backoff marker of the key (present while it waits out a retry backoff)
-- KEYS[9] paused keys hash of the pool (key digest -> JSON pause record; present = paused)
-- ARGV[1] key digest (store.keys.key_digest)
local dl, parked, ids, replaying, deferred = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local queue, outbox, backoff, paused = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local digest = ARGV[1]

-- An operator paused the key (``partitioning pause --key``).
local function is_paused()
  return redis.call('HEXISTS', paused, digest) == 1
end

-- The key's messages are set aside: it is parked behind a dead letter, waits out the retry
-- backoff of its first message, or is paused.
local function set_aside()
  return redis.call('HEXISTS', dl, digest) == 1 or redis.call('EXISTS', backoff) == 1
    or is_paused()
end

-- Re-queue set-aside messages, oldest first, ahead of anything newer: to the head of the
-- queue (or the outbox); each is 'replaying' until it is done.
local function requeue(waiting)
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

-- The last replayed message is done: the messages deferred behind the replay go next
-- (to the head of the queue), or behind the set-aside ones if the key is set aside again.
local function drain_deferred()
  if redis.call('SCARD', replaying) > 0 then return end
  local waiting = redis.call('LRANGE', deferred, 0, -1)
  if #waiting == 0 then return end
  redis.call('DEL', deferred)
  if set_aside() then
    for i = 1, #waiting do redis.call('RPUSH', parked, waiting[i]) end
  else
    requeue(waiting)
  end
end
