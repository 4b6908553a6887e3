--[[
  Commit one versioned multi-stream write, atomically: events, and with them
  the timeouts and side effects (the process index) they imply.

  1. Check the expected version of every stream the command read, including
     streams it only read. On the first mismatch, return a conflict having
     written nothing; likewise refuse to append to a removed process's stream.
  2. Append each stream's new events with entry id <version>-0, and each event
     to the shard log in commit order (fields s = stream id, v = version,
     t = event type, d = envelope).
  3. Schedule and cancel timeouts (see includes/timeouts.lua).
  4. Apply side effects: each names a function of SIDE_EFFECTS below, called
     with its keys, the server's now (ms) and its args; the caller (see
     rsaga.scripts.Scripts.commit) checks the names. The process index
     (includes/process_index.lua) is one.
  5. Add dead letters that report failures to an operator (a saga whose
     compensation failed), once, with the events that record the failure.
  6. Store snapshots of folded states (rsaga/snapshots.py), each at the
     version step 1 checked for its stream.

  Input:
    KEYS[1]              shard log
    KEYS[2 .. n+1]       the n checked streams
    then, if any timeout is scheduled or cancelled: the shard's timeouts
                         sorted set, timeout data hash and wake stream
    then, per side effect: its K keys
    then, if any dead letter is added: the shard's dead-letter stream
    then, per snapshot: its hash (Keyspace.snapshot: fields v, d)
    ARGV[1]              n
    ARGV[2 .. 3n+1]      per checked stream: stream id, expected version
                         (-1 any, 0 no stream yet, N exact), count of new events
    then                 the new events as (type, envelope) pairs, stream by stream
    then                 S, and S x (timeout id, due ms, payload) to schedule
    then                 C, and C x timeout id to cancel
    then                 E, and E x (name, K, A, then A args) side effects
    then                 D, the dead letters' approximate max length, and
                         D x (F, then F field/value pairs) dead letters
    then                 P, and P x (version, snapshot bytes)

  Output:
    {0, v_1 .. v_n}      OK: the version of each checked stream after the write
    {-1, i, actual}      CONFLICT: checked stream i is at version `actual`
    {-2, i}              REMOVED: stream i is a removed process's tombstone
                         (remove_expired.lua), which takes no new events
]]
-- @include "record_fields"
-- @include "stream_version"
-- @include "now_ms"
-- @include "timeouts"
-- @include "process_index"

local SIDE_EFFECTS = {process_index = update_process_index}

local n = tonumber(ARGV[1])
local versions = {}
for i = 1, n do
  local expected = tonumber(ARGV[3 * i])
  local actual, tombstone = stream_version(KEYS[i + 1])
  if expected >= 0 and actual ~= expected then
    return {-1, i, actual}
  end
  if tombstone and tonumber(ARGV[3 * i + 1]) > 0 then
    return {-2, i}
  end
  versions[i] = actual
end

local log = KEYS[1]
local arg = 3 * n + 2
for i = 1, n do
  local stream_id = ARGV[3 * i - 1]
  local count = tonumber(ARGV[3 * i + 1])
  local key = KEYS[i + 1]
  local version = versions[i]
  for _ = 1, count do
    version = version + 1
    local event_type, envelope = ARGV[arg], ARGV[arg + 1]
    arg = arg + 2
    redis.call('XADD', key, version .. '-0', RECORD.data, envelope)
    redis.call('XADD', log, '*', RECORD.stream, stream_id, RECORD.version, version,
      RECORD.type, event_type, RECORD.data, envelope)
  end
  versions[i] = version
end

local key = n + 2
local schedules = tonumber(ARGV[arg] or 0)
local cancels = tonumber(ARGV[arg + 1 + 3 * schedules] or 0)
if schedules + cancels > 0 then
  local zset, data, wake = KEYS[key], KEYS[key + 1], KEYS[key + 2]
  key = key + 3
  for _ = 1, schedules do
    schedule_timeout(zset, data, wake, ARGV[arg + 1], ARGV[arg + 2], ARGV[arg + 3])
    arg = arg + 3
  end
  arg = arg + 1
  for _ = 1, cancels do
    cancel_timeout(zset, data, ARGV[arg + 1])
    arg = arg + 1
  end
  arg = arg + 1
else
  arg = arg + 2
end

local side_effects = tonumber(ARGV[arg] or 0)
local now = nil
for _ = 1, side_effects do
  local name = ARGV[arg + 1]
  local key_count, arg_count = tonumber(ARGV[arg + 2]), tonumber(ARGV[arg + 3])
  local effect_keys = {}
  for j = 1, key_count do
    effect_keys[j] = KEYS[key + j - 1]
  end
  now = now or now_ms()
  SIDE_EFFECTS[name](effect_keys, now, unpack(ARGV, arg + 4, arg + 3 + arg_count))
  key = key + key_count
  arg = arg + 3 + arg_count
end
arg = arg + 1

local letters = tonumber(ARGV[arg] or 0)
local max_len = ARGV[arg + 1]
arg = arg + 1
for _ = 1, letters do
  local count = tonumber(ARGV[arg + 1])
  local fields = {}
  for i = 1, count do
    fields[i] = ARGV[arg + 1 + i]
  end
  redis.call('XADD', KEYS[key], 'MAXLEN', '~', max_len, '*', unpack(fields))
  arg = arg + 1 + count
end

-- 6. Snapshots (a section of its own: ARGV after the dead letters, KEYS last).
if letters > 0 then
  key = key + 1
end
local snapshots = tonumber(ARGV[arg + 1] or 0)
for i = 1, snapshots do
  redis.call('HSET', KEYS[key + i - 1], 'v', ARGV[arg + 2 * i], 'd', ARGV[arg + 2 * i + 1])
end

return {0, unpack(versions)}
