--[[
  Acknowledge one log entry for a group, if it is still pending on `consumer`,
  and release that consumer's hold on the entry's stream: the stream's
  in-flight count drops, and at zero nobody owns the stream.
  An entry another consumer has taken over is left alone: that consumer runs
  it now, and acknowledging it here would release a stream it holds.
  Returns 1 if this call acknowledged the entry, else 0.
]]
local function release_entry(log, owners, counts, group, consumer, id, stream_id)
  local pending = redis.call('XPENDING', log, group, id, id, 1)
  if not pending[1] or pending[1][2] ~= consumer then
    return 0
  end
  redis.call('XACK', log, group, id)
  if stream_id ~= '' then
    if redis.call('HINCRBY', counts, stream_id, -1) <= 0 then
      redis.call('HDEL', counts, stream_id)
      redis.call('HDEL', owners, stream_id)
    end
  end
  return 1
end
