--[[
  The lifecycle index of one process type on one shard:
  - active: sorted set of active processes without a pending timeout, scored
    by last progress (server ms): stuck once that is long ago;
  - waiting: sorted set of active processes with a pending timeout, scored by
    the due time of the earliest (next_due, ms): stuck once that is long past;
  - stats: counters started, completed, failed, compensated, and duration_ms_total;
  - durations: the last 1000 durations (ms) of finished processes, for p99;
  - completed / failed / compensated: the last 10000 finished processes scored
    by end time.
  transition is 'start', 'progress', 'complete', 'fail' or 'compensate'.
]]
local function update_process_index(keys, transition, member, duration_ms, next_due, now)
  local active, stats, durations, waiting = keys[1], keys[2], keys[3], keys[7]
  local ends = {
    complete = {'completed', keys[4]}, fail = {'failed', keys[5]},
    compensate = {'compensated', keys[6]},
  }
  if transition == 'start' or transition == 'progress' then
    local indexed = redis.call('ZREM', active, member) + redis.call('ZREM', waiting, member)
    if transition == 'start' then
      redis.call('HINCRBY', stats, 'started', 1)
    elseif indexed == 0 then
      return  -- a late step of a process already finished (or never indexed)
    end
    if tonumber(next_due) >= 0 then
      redis.call('ZADD', waiting, next_due, member)
    else
      redis.call('ZADD', active, now, member)
    end
  else
    local counter, finished = ends[transition][1], ends[transition][2]
    redis.call('ZREM', active, member)
    redis.call('ZREM', waiting, member)
    redis.call('HINCRBY', stats, counter, 1)
    redis.call('HINCRBY', stats, 'duration_ms_total', duration_ms)
    redis.call('LPUSH', durations, duration_ms)
    redis.call('LTRIM', durations, 0, 999)
    redis.call('ZADD', finished, now, member)
    redis.call('ZREMRANGEBYRANK', finished, 0, -10001)
  end
end
