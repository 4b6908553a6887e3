--[[
  Read the next batch of a shard log for one consumer of a group, keeping every
  stream's entries with one consumer at a time (per-stream order across
  processes: a consumer group alone spreads entries with no regard to stream).

  1. Note that this consumer is alive, and take (up to `count`) the entries
     other consumers handed to it; if more remain, stop here (newer entries
     must not overtake them).
  2. XREADGROUP up to `count` new entries. An entry whose type (field t) the
     group does not want, or replayed for another group (field g), is
     acknowledged at once, here (all in one XACK). For each other entry of
     stream S:
     - if a live consumer owns S (it holds in-flight entries of S), hand the
       entry to that owner: XCLAIM it over and note it in the owner's handoffs;
     - if a dead consumer owns S, take over everything it holds first
       (spread over the live consumers, see includes/take_over.lua), and
       hand the entry to S's new owner if that is another consumer;
     - else this consumer owns S, and the entry is returned.
     Each entry counts towards its stream's in-flight count until acknowledged.
  3. If nothing was read at all, return the log's last entry id, so the caller
     can block on XREAD from there without missing anything.

  Input:
    KEYS[1] shard log        KEYS[2] owners (stream id -> consumer)
    KEYS[3] in-flight counts (stream id -> n)   KEYS[4] handoffs (consumer -> ids)
    KEYS[5] alive (consumer -> last seen ms)
    ARGV[1] group   ARGV[2] consumer   ARGV[3] count   ARGV[4] claim timeout ms
    ARGV[5] '1' to keep only the event types in ARGV[6 ..] (none: no typed entry),
            '0' for every entry

  Output:
    {last_id, entries, deliveries}   entries as {id, fields} in the order to run
                                     them; last_id is '' unless nothing was read.
]]
-- @include "record_fields"
-- @include "group_entries"
-- @include "entry_field"
-- @include "now_ms"
-- @include "is_dead"
-- @include "pop_handoffs"
-- @include "take_over"
-- @include "call_in_chunks"

local log, owners, counts, handoffs, alive = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local group, me, count, timeout_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
redis.call('HSET', alive, me, now)

local entries, deliveries, more_handed = pop_handoffs(log, handoffs, group, me, count)
local read = {}
if not more_handed then
  local reply = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', count, 'STREAMS', log, '>')
  read = group_entries(reply)
end
local wanted = nil
if ARGV[5] == '1' then
  wanted = {}
  for i = 6, #ARGV do
    wanted[ARGV[i]] = true
  end
end
local owner_of, handed_to, unwanted = {}, {}, {}
for _, entry in ipairs(read) do
  local fields = entry[2]
  local stream_id = entry_field(fields, RECORD.stream)
  local mine = true
  local event_type = wanted and entry_field(fields, RECORD.type)
  local target = entry_field(fields, RECORD.group)
  if (event_type and not wanted[event_type]) or (target and target ~= group) then
    unwanted[#unwanted + 1] = entry[1]
    mine = false
  elseif stream_id and stream_id ~= '' then
    redis.call('HINCRBY', counts, stream_id, 1)
    local owner = owner_of[stream_id]
    if owner == nil then
      owner = redis.call('HGET', owners, stream_id) or false
    end
    if owner and owner ~= me and is_dead(alive, owner, now, timeout_ms) then
      take_over(log, group, owners, alive, handoffs, me, owner, entries, deliveries, now,
                timeout_ms)
      owner = redis.call('HGET', owners, stream_id) or false
    end
    if owner and owner ~= me then
      mine = false
      redis.call('XCLAIM', log, group, owner, 0, entry[1], 'JUSTID')
      local ids = handed_to[owner]
      if not ids then
        ids = {}
        handed_to[owner] = ids
      end
      ids[#ids + 1] = entry[1]
    elseif owner ~= me then
      redis.call('HSET', owners, stream_id, me)
      owner = me
    end
    owner_of[stream_id] = owner
  end
  if mine then
    entries[#entries + 1] = entry
    deliveries[#deliveries + 1] = 1
  end
end
call_in_chunks('XACK', log, unwanted, group)
for owner, ids in pairs(handed_to) do
  local queued = redis.call('HGET', handoffs, owner)
  local added = table.concat(ids, ' ')
  redis.call('HSET', handoffs, owner, queued and (queued .. ' ' .. added) or added)
end

local last_id = ''
if #entries == 0 and #read == 0 and not more_handed then
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  last_id = #last == 1 and last[1][1] or '0-0'
end
return {last_id, entries, deliveries}
