--[[
  The lifecycle index of one process type on one shard (keys in the order of
  Keyspace.process_index):
  1. active: sorted set of active processes without a pending timeout, scored
     by last progress (server ms): stuck once that is long ago;
  2. stats: counters started, completed, failed, compensated, and duration_ms_total;
  3. durations: the last 1000 durations (ms) of finished processes, for p99 and
     the mean of the average-duration check;
  4-6. completed / failed / compensated: the last 10000 finished processes
     scored by end time (server ms); older ones leave every index;
  7. waiting: sorted set of active processes with a pending timeout, scored by
     the due time of the earliest (next_due, ms): stuck once that is long past;
  8. since: sorted set of active processes scored by start (server ms): the
     max-age check and the search of active processes;
  9. retrying: sorted set of active processes whose current step is being
     retried, scored by its retry count: the max-retry-count check;
  10. records: hash process stream id -> cjson {c = correlation id of its start,
     s = start ms, r = retried step, n = retries (while retrying)}, for every
     process in 1, 4-7: what search shows and filters on (a finished process's
     end and outcome are its score and set in 4-6);
  11. by_correlation: sorted set (all scores 0) of "<correlation id>\0<stream id>";
  12. by_id: sorted set (all scores 0) of stream ids: prefix search;
  13. types: set of the process types indexed on the shard;
  14. expiring: sorted set of finished processes scored by when their retention
     passes (end + retention, server ms): what remove_expired.lua removes; a
     process kept for ever (retention -1) is not in it. It is not capped like
     4-6, so a process pushed out of those is still removed in time.
  transition is 'start', 'progress', 'complete', 'fail' or 'compensate'; starts
  is '1' when this commit starts the process (a process may start and end in one);
  retries is the retry count of the current step after the commit, 0 when the
  process stops retrying, -1 when it neither was nor is retrying (nothing to write);
  retention_ms how long a process this commit finishes is kept (-1: for ever).
]]
local FINISHED_KEPT = 10000

local function read_record(records, member)
  local blob = redis.call('HGET', records, member)
  if blob then
    return cjson.decode(blob)
  end
  return {}
end

local function forget_finished(keys, finished)
  local extra = redis.call('ZCARD', finished) - FINISHED_KEPT
  if extra <= 0 then
    return
  end
  local records, by_correlation, by_id = keys[10], keys[11], keys[12]
  for _, gone in ipairs(redis.call('ZRANGE', finished, 0, extra - 1)) do
    local record = read_record(records, gone)
    if record.c then
      redis.call('ZREM', by_correlation, record.c .. '\0' .. gone)
    end
    redis.call('ZREM', by_id, gone)
    redis.call('HDEL', records, gone)
  end
  redis.call('ZREMRANGEBYRANK', finished, 0, extra - 1)
end

local function note_retries(retrying, records, member, retry_step, retries)
  local record = read_record(records, member)
  if retries > 0 then
    redis.call('ZADD', retrying, retries, member)
    record.r, record.n = retry_step, retries
  else
    redis.call('ZREM', retrying, member)
    record.r, record.n = nil, nil
  end
  redis.call('HSET', records, member, cjson.encode(record))
end

local function update_process_index(
  keys, now, process_type, transition, member, duration_ms, next_due, starts, correlation,
  retry_step, retries, retention_ms
)
  local active, stats, durations, waiting = keys[1], keys[2], keys[3], keys[7]
  local since, retrying, records = keys[8], keys[9], keys[10]
  local ends = {complete = keys[4], fail = keys[5], compensate = keys[6]}
  local counters = {complete = 'completed', fail = 'failed', compensate = 'compensated'}
  retries = tonumber(retries)
  if starts == '1' then
    redis.call('SADD', keys[13], process_type)
    redis.call('HINCRBY', stats, 'started', 1)
    redis.call('ZADD', since, now, member)
    redis.call('ZADD', keys[11], 0, correlation .. '\0' .. member)
    redis.call('ZADD', keys[12], 0, member)
    redis.call('HSET', records, member, cjson.encode({c = correlation, s = now}))
  end
  if transition == 'start' or transition == 'progress' then
    local indexed = redis.call('ZREM', active, member) + redis.call('ZREM', waiting, member)
    if transition == 'progress' and indexed == 0 then
      return  -- a late step of a process already finished (or never indexed)
    end
    if tonumber(next_due) >= 0 then
      redis.call('ZADD', waiting, next_due, member)
    else
      redis.call('ZADD', active, now, member)
    end
    if retries >= 0 then
      note_retries(retrying, records, member, retry_step, retries)
    end
  else
    local finished = ends[transition]
    redis.call('ZREM', active, member)
    redis.call('ZREM', waiting, member)
    redis.call('ZREM', since, member)
    if retries >= 0 then
      redis.call('ZREM', retrying, member)
    end
    redis.call('HINCRBY', stats, counters[transition], 1)
    redis.call('HINCRBY', stats, 'duration_ms_total', duration_ms)
    redis.call('LPUSH', durations, duration_ms)
    redis.call('LTRIM', durations, 0, 999)
    redis.call('ZADD', finished, now, member)
    forget_finished(keys, finished)
    retention_ms = tonumber(retention_ms)
    if retention_ms >= 0 then
      redis.call('ZADD', keys[14], now + retention_ms, member)
    end
  end
end
