--[[
  Remove one batch of finished processes of one type on one shard whose
  retention has passed: each one's stream is replaced by its tombstone, a
  string key holding one envelope (rsaga.ProcessRemoved) that reads as the
  stream's one event at version 1 (includes/stream_version.lua), so a late
  trigger folds a finished process and is ignored instead of starting a new
  one; its entries in the process index go (the counters and durations stay).

  A candidate is removed only if, now, it is in `expiring` with a score at or
  before now, and it is not active (in none of active, waiting, since): a
  finished process never becomes active again, so this only guards against a
  caller passing the wrong streams. Its timeouts went in the commit that
  finished it (that commit cancels every pending one), so there is no timeout
  data left to remove. An active candidate, or one already a tombstone, is
  only taken out of `expiring`.

  Input:
    KEYS[1 .. 14]        the type's process index (Keyspace.process_index order:
                         active, stats, durations, completed, failed, compensated,
                         waiting, since, retrying, records, by_correlation, by_id,
                         types, expiring)
    KEYS[15 .. 14+n]     the n candidates' process streams
    KEYS[15+n .. 14+2n]  their snapshot hashes (rsaga/snapshots.py), deleted with them
    ARGV[1]              now (ms), or '' for the Redis server's clock
    ARGV[2 .. 2n+1]      per candidate: its stream id, its tombstone envelope

  Output:
    the number of processes removed
]]
-- @include "now_ms"
-- @include "stream_version"

local active, waiting, since, retrying = KEYS[1], KEYS[7], KEYS[8], KEYS[9]
local finished = {KEYS[4], KEYS[5], KEYS[6]}
local records, by_correlation, by_id, expiring = KEYS[10], KEYS[11], KEYS[12], KEYS[14]
local now = tonumber(ARGV[1]) or now_ms()

local removed = 0
local n = (#KEYS - 14) / 2
for i = 1, n do
  local member, tombstone = ARGV[2 * i], ARGV[2 * i + 1]
  local due = redis.call('ZSCORE', expiring, member)
  local is_active = redis.call('ZSCORE', since, member)
    or redis.call('ZSCORE', active, member) or redis.call('ZSCORE', waiting, member)
  if due and tonumber(due) <= now and is_active then
    redis.call('ZREM', expiring, member)  -- not finished: it goes back in when it finishes
  elseif due and tonumber(due) <= now and select(2, stream_version(KEYS[14 + i])) then
    redis.call('ZREM', expiring, member)  -- removed before (a backfill raced that removal)
  elseif due and tonumber(due) <= now then
    local stream = KEYS[14 + i]
    redis.call('SET', stream, tombstone)
    redis.call('DEL', KEYS[14 + n + i])
    local blob = redis.call('HGET', records, member)
    if blob then
      local record = cjson.decode(blob)
      if record.c then
        redis.call('ZREM', by_correlation, record.c .. '\0' .. member)
      end
      redis.call('HDEL', records, member)
    end
    for _, set in ipairs(finished) do
      redis.call('ZREM', set, member)
    end
    redis.call('ZREM', by_id, member)
    redis.call('ZREM', retrying, member)
    redis.call('ZREM', expiring, member)
    removed = removed + 1
  end
end
return removed
