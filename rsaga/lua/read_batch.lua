--[[
  Read the next batch of a shard log for one consumer of a group, keeping every
  stream's entries with one consumer at a time (per-stream order across
  processes: a consumer group alone spreads entries with no regard to stream).

  1. Note that this consumer is alive, and take the entries other consumers
     handed to it.
  2. XREADGROUP up to `count` new entries. For each entry of stream S:
     - if a live consumer owns S (it holds in-flight entries of S), hand the
       entry to that owner: XCLAIM it over and note it in the owner's handoffs;
     - if a dead consumer owns S, take over everything it holds first;
     - then this consumer owns S, and the entry is returned.
     Each entry counts towards its stream's in-flight count until acknowledged.
  3. With nothing to return, return the log's last entry id, so the caller can
     block on XREAD from there without missing anything.

  Input:
    KEYS[1] shard log        KEYS[2] owners (stream id -> consumer)
    KEYS[3] in-flight counts (stream id -> n)   KEYS[4] handoffs (consumer -> ids)
    KEYS[5] alive (consumer -> last seen ms)
    ARGV[1] group   ARGV[2] consumer   ARGV[3] count   ARGV[4] claim timeout ms

  Output:
    {last_id, entries, deliveries}   entries as {id, fields} in the order to run
                                     them; last_id is '' unless there are none.
]]
-- @include "group_entries"
-- @include "entry_field"
-- @include "now_ms"
-- @include "is_dead"
-- @include "pop_handoffs"
-- @include "take_over"

local log, owners, counts, handoffs, alive = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, me, timeout_ms = ARGV[1], ARGV[2], tonumber(ARGV[4])
local now = now_ms()
redis.call('HSET', alive, me, now)

local entries = pop_handoffs(log, handoffs, group, me)
local deliveries = {}
for i = 1, #entries do
  deliveries[i] = 1
end
local reply = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', ARGV[3], 'STREAMS', log, '>')
for _, entry in ipairs(group_entries(reply)) do
  local stream_id = entry_field(entry[2], 's')
  local mine = true
  if stream_id then
    redis.call('HINCRBY', counts, stream_id, 1)
    local owner = redis.call('HGET', owners, stream_id)
    if owner and owner ~= me then
      if is_dead(alive, owner, now, timeout_ms) then
        take_over(log, group, owners, alive, handoffs, me, owner, entries, deliveries)
      else
        mine = false
        redis.call('XCLAIM', log, group, owner, 0, entry[1], 'JUSTID')
        local queued = redis.call('HGET', handoffs, owner)
        redis.call('HSET', handoffs, owner, queued and (queued .. ' ' .. entry[1]) or entry[1])
      end
    end
    if mine then
      redis.call('HSET', owners, stream_id, me)
    end
  end
  if mine then
    entries[#entries + 1] = entry
    deliveries[#deliveries + 1] = 1
  end
end

local last_id = ''
if #entries == 0 then
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  last_id = #last == 1 and last[1][1] or '0-0'
end
return {last_id, entries, deliveries}
