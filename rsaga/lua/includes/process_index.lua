--[[
  The lifecycle index of one process type on one shard: a sorted set of active
  processes scored by their last progress (server ms), and counters of
  started, completed and failed processes plus the total duration of the
  finished ones.
  transition is 'start', 'progress', 'complete' or 'fail'.
]]
local function update_process_index(active, stats, transition, member, duration_ms, now)
  if transition == 'start' then
    redis.call('ZADD', active, now, member)
    redis.call('HINCRBY', stats, 'started', 1)
  elseif transition == 'progress' then
    redis.call('ZADD', active, 'XX', now, member)
  else
    redis.call('ZREM', active, member)
    redis.call('HINCRBY', stats, transition == 'complete' and 'completed' or 'failed', 1)
    redis.call('HINCRBY', stats, 'duration_ms_total', duration_ms)
  end
end
