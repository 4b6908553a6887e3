--[[
  Timeouts of one shard: a sorted set (member = timeout id, score = due ms), a
  hash (timeout id -> payload), and a wake stream the scheduler blocks on.
  schedule_timeout wakes the scheduler only when the new timeout is due before
  every other one, so it never sleeps past it.
  A timeout id is "<process stream id>|<timeout name>" (rsaga.process.timeouts
  builds it); timeout_stream_id is the one place Lua takes it apart.
]]
-- @include "record_fields"
local function timeout_stream_id(id)
  return string.match(id, '^(.*)|[^|]*$') or id
end

local function schedule_timeout(zset, data, wake, id, due, payload)
  local head = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  redis.call('ZADD', zset, due, id)
  redis.call('HSET', data, id, payload)
  if #head == 0 or tonumber(due) < tonumber(head[2]) then
    redis.call('XADD', wake, 'MAXLEN', '~', 10, '*', RECORD.due, due)
  end
end

local function cancel_timeout(zset, data, id)
  redis.call('ZREM', zset, id)
  redis.call('HDEL', data, id)
end
