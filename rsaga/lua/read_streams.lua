--[[
  Read a page of events from each of several streams of one shard, and each
  stream's version, in one round trip (a command's read).

  Input:
    KEYS[1 .. n]   the streams
    KEYS[n+1 .. 2n] optional: per stream, its snapshot hash (fields v = version,
                   d = snapshot; see commit.lua section 6), used when the stream
                   is read from version 1
    ARGV[1]        page size
    ARGV[2 .. n+1] the version to start from, per stream

  Output:
    per stream: {version, v_1, d_1, v_2, d_2, ...}   the stream's current version,
                then up to a page of (version, envelope) pairs from the start;
                a snapshot used comes first as the pair (0, snapshot), and the
                events then start after its version (a removed process's
                tombstone reads as its one event, version 1)
]]
-- @include "record_fields"
-- @include "stream_version"

local n = #ARGV - 1
local out = {}
for i = 1, n do
  local key = KEYS[i]
  local version, tombstone = stream_version(key)
  local from = tonumber(ARGV[i + 1])
  local flat = {version}
  local page = {}
  if tombstone then
    if from <= 1 then
      page = {{'1-0', {RECORD.data, redis.call('GET', key)}}}
    end
  else
    if KEYS[n + i] and from == 1 then
      local snapshot = redis.call('HMGET', KEYS[n + i], 'v', 'd')
      local at = tonumber(snapshot[1])
      if at and snapshot[2] and at <= version then
        flat[2], flat[3] = 0, snapshot[2]
        from = at + 1
      end
    end
    page = redis.call('XRANGE', key, from .. '-0', '+', 'COUNT', ARGV[1])
  end
  for _, entry in ipairs(page) do
    flat[#flat + 1] = tonumber(string.match(entry[1], '^(%d+)'))
    local fields = entry[2]
    for j = 1, #fields, 2 do
      if fields[j] == RECORD.data then
        flat[#flat + 1] = fields[j + 1]
      end
    end
    if #flat % 2 == 0 then
      flat[#flat + 1] = false
    end
  end
  out[i] = flat
end
return out
