--[[
  Take over every consumer of a group that has been silent for longer than the
  claim timeout (its worker died or hung): all its pending entries and the
  ownership of their streams, spread over the live consumers (see
  includes/take_over.lua). Consumers with
  pending entries that never reported being alive count as dead too.

  Input:
    KEYS[1] shard log   KEYS[2] owners   KEYS[3] alive   KEYS[4] handoffs
    ARGV[1] group   ARGV[2] consumer   ARGV[3] claim timeout ms

  Output:
    {entries, deliveries, dead}   the entries this consumer runs, as {id, fields}
                                  in log order, how often each has been
                                  delivered, and the consumers taken over
]]
-- @include "now_ms"
-- @include "is_dead"
-- @include "take_over"

local log, owners, alive, handoffs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local group, me, timeout_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
redis.call('HSET', alive, me, now)

local suspects = {}
local known = redis.call('HGETALL', alive)
for i = 1, #known, 2 do
  if string.sub(known[i], 1, 8) ~= 'running:' then
    suspects[known[i]] = true
  end
end
local summary = redis.call('XPENDING', log, group)
for _, item in ipairs(summary[4] or {}) do
  suspects[item[1]] = true
end

local entries, deliveries, dead = {}, {}, {}
for consumer in pairs(suspects) do
  if consumer ~= me and is_dead(alive, consumer, now, timeout_ms) then
    take_over(log, group, owners, alive, handoffs, me, consumer, entries, deliveries, now,
              timeout_ms)
    dead[#dead + 1] = consumer
  end
end
return {entries, deliveries, dead}
