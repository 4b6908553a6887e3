--[[
  Commit one versioned multi-stream write, atomically.

  1. Check the expected version of every stream the command read, including
     streams it only read. On the first mismatch, return a conflict having
     written nothing.
  2. Append each stream's new events with entry id <version>-0, and each event
     to the shard log in commit order (fields s = stream id, v = version,
     d = envelope).

  Input:
    KEYS[1]              shard log
    KEYS[2 .. n+1]       the n checked streams
    ARGV[1]              n
    ARGV[2 .. 3n+1]      per checked stream: stream id, expected version
                         (-1 any, 0 no stream yet, N exact), count of new events
    ARGV[3n+2 ..]        the envelopes of the new events, stream by stream

  Output:
    {0, v_1 .. v_n}      OK: the version of each checked stream after the write
    {-1, i, actual}      CONFLICT: checked stream i is at version `actual`
]]
-- @include "stream_version"

local n = tonumber(ARGV[1])
local versions = {}
for i = 1, n do
  local expected = tonumber(ARGV[3 * i])
  local actual = stream_version(KEYS[i + 1])
  if expected >= 0 and actual ~= expected then
    return {-1, i, actual}
  end
  versions[i] = actual
end

local log = KEYS[1]
local next_arg = 3 * n + 2
for i = 1, n do
  local stream_id = ARGV[3 * i - 1]
  local count = tonumber(ARGV[3 * i + 1])
  local key = KEYS[i + 1]
  local version = versions[i]
  for _ = 1, count do
    version = version + 1
    local envelope = ARGV[next_arg]
    next_arg = next_arg + 1
    redis.call('XADD', key, version .. '-0', 'd', envelope)
    redis.call('XADD', log, '*', 's', stream_id, 'v', version, 'd', envelope)
  end
  versions[i] = version
end

return {0, unpack(versions)}
