-- resize_release.lua: release(...) of the resize scripts that include it (after message_id.lua).
--
-- release(digest, moved, held, pending, queue, outbox, waiting, ids, released): the key's
-- moved messages, then its held ones, go to the head of its new partition's Redis list
-- (``queue``), or, when ``queue`` is '' (a broker that cannot push to the head: RabbitMQ), to
-- the partition's outbox, published to the tail right after; their ids go to ``released``
-- (and to the key's ``pending`` set: until they are all back, newer messages of the key are
-- still held, and the key stays in ``waiting`` as 'r'). Returns how many were released.
local function release(digest, moved, held, pending, queue, outbox, waiting, ids, released)
  local going = redis.call('LRANGE', moved, 0, -1)
  local newer = redis.call('LRANGE', held, 0, -1)
  for j = 1, #newer do going[#going + 1] = newer[j] end
  if #going == 0 then return 0 end
  if queue ~= '' then
    -- the head is the right end: push the newest first, the oldest moved message last
    for j = #going, 1, -1 do redis.call('RPUSH', queue, going[j]) end
  else
    for j = 1, #going do redis.call('RPUSH', outbox, going[j]) end
  end
  for j = 1, #going do
    local mid = message_id(going[j])
    redis.call('SREM', ids, mid)
    redis.call('SADD', released, mid)
    if queue == '' then redis.call('SADD', pending, mid) end
  end
  redis.call('DEL', moved, held)
  if queue ~= '' then
    redis.call('HDEL', waiting, digest)
  else
    redis.call('HSET', waiting, digest, 'r')
  end
  return #going
end
