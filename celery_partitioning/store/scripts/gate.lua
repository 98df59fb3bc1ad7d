-- gate.lua: the parking gate, as a function of the scripts that include it (after prelude.lua).
--
-- KEYS[10] the task id's in-place retry record (string)
-- gate(id, raw) returns {verdict, attempt record ('' if none; read only for 'run'),
-- 1 if the message belongs to a replay in flight (its end must be reported) else 0}.
-- Verdicts: run, parked (set aside), paused (set aside: only a pause holds the key),
-- deferred (behind a replay), duplicate (stored already).
-- ``replaying`` holds the replayed messages until they are done (not merely received), so
-- one that comes back after a crash is still recognized as older than the deferred ones.
local attempts = KEYS[10]

local function gate(id, raw)
  -- the happy path: nothing replayed, stored or parked for the key (what the checks below
  -- would conclude from these very keys, in two commands; a key in backoff always has its
  -- retried message's id in ``ids``)
  if redis.call('EXISTS', replaying, ids) == 0 and redis.call('HEXISTS', dl, digest) == 0
     and not is_paused() then
    return {'run', redis.call('GET', attempts) or '', 0}
  end
  if redis.call('SISMEMBER', replaying, id) == 1 then
    if not set_aside() then
      return {'run', redis.call('GET', attempts) or '', 1}
    end
    -- the replay's first message failed again (or retries after a backoff): the rest of the
    -- replay is set aside again, in order
    redis.call('SREM', replaying, id)
    if redis.call('SADD', ids, id) == 1 then redis.call('RPUSH', parked, raw) end
    drain_deferred()
    return {'parked', '', 0}
  end
  if redis.call('SISMEMBER', ids, id) == 1 then return {'duplicate', '', 0} end
  if redis.call('SCARD', replaying) > 0 then
    redis.call('SADD', ids, id)
    redis.call('RPUSH', deferred, raw)
    return {'deferred', '', 0}
  end
  if set_aside() then
    redis.call('SADD', ids, id)
    redis.call('RPUSH', parked, raw)
    if redis.call('HEXISTS', dl, digest) == 0 and redis.call('EXISTS', backoff) == 0 then
      return {'paused', '', 0}
    end
    return {'parked', '', 0}
  end
  return {'run', redis.call('GET', attempts) or '', 0}
end
