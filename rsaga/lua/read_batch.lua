--[[
  Read the next batch of a shard log for one consumer of a group, keeping every
  stream's entries with one consumer at a time (per-stream order across
  processes: a consumer group alone spreads entries with no regard to stream).

  1. Take the entries other consumers handed to this one.
  2. XREADGROUP up to `count` new entries. For each entry of stream S:
     - if another consumer owns S (it holds in-flight entries of S), hand the
       entry to that owner: XCLAIM it over and note it in the owner's handoffs;
     - else this consumer owns S; the entry is returned.
     Each entry counts towards its stream's in-flight count until acknowledged.
  3. With nothing to return, return the log's last entry id, so the caller can
     block on XREAD from there without missing anything.

  Input:
    KEYS[1] shard log        KEYS[2] owners hash (stream id -> consumer)
    KEYS[3] in-flight counts (stream id -> n)   KEYS[4] handoffs (consumer -> ids)
    ARGV[1] group   ARGV[2] consumer   ARGV[3] count

  Output:
    {last_id, handed, new}   handed and new are lists of {id, fields};
                             last_id is '' unless both are empty.
]]
-- @include "group_entries"
-- @include "entry_field"
-- @include "pop_handoffs"

local log, owners, counts, handoffs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, me = ARGV[1], ARGV[2]

local handed = pop_handoffs(log, handoffs, me)
local reply = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', ARGV[3], 'STREAMS', log, '>')
local mine = {}
for _, entry in ipairs(group_entries(reply)) do
  local stream_id = entry_field(entry[2], 's')
  if not stream_id then
    mine[#mine + 1] = entry
  else
    redis.call('HINCRBY', counts, stream_id, 1)
    local owner = redis.call('HGET', owners, stream_id)
    if owner and owner ~= me then
      redis.call('XCLAIM', log, group, owner, 0, entry[1], 'JUSTID')
      local queued = redis.call('HGET', handoffs, owner)
      redis.call('HSET', handoffs, owner, queued and (queued .. ' ' .. entry[1]) or entry[1])
    else
      redis.call('HSET', owners, stream_id, me)
      mine[#mine + 1] = entry
    end
  end
end

local last_id = ''
if #handed == 0 and #mine == 0 then
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  last_id = #last == 1 and last[1][1] or '0-0'
end
return {last_id, handed, mine}
