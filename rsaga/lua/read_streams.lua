--[[
  Read a page of events from each of several streams of one shard, and each
  stream's version, in one round trip (a command's read).

  Input:
    KEYS[1 .. n]   the streams
    ARGV[1]        page size
    ARGV[2 .. n+1] the version to start from, per stream

  Output:
    per stream: {version, v_1, d_1, v_2, d_2, ...}   the stream's current version,
                then up to a page of (version, envelope) pairs from the start
                (a removed process's tombstone reads as its one event, version 1)
]]
-- @include "record_fields"
-- @include "stream_version"

local out = {}
for i, key in ipairs(KEYS) do
  local version, tombstone = stream_version(key)
  local page = {}
  if not tombstone then
    page = redis.call('XRANGE', key, ARGV[i + 1] .. '-0', '+', 'COUNT', ARGV[1])
  elseif tonumber(ARGV[i + 1]) <= 1 then
    page = {{'1-0', {RECORD.data, redis.call('GET', key)}}}
  end
  local flat = {version}
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
