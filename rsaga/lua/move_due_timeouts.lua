--[[
  Move the timeouts that are due from a shard's sorted set onto its due stream,
  atomically: each one is either still scheduled or on the due stream, never
  both and never neither, so a scheduler that dies between calls loses and
  duplicates nothing, and any number of schedulers may run at once.
  Each due entry names its process type in field t: workers read the due
  stream with one consumer group per process type, and read_batch.lua
  acknowledges the entries of other types inside Redis, so a timeout reaches
  only workers that run its process type.

  Input:
    KEYS[1] timeouts sorted set   KEYS[2] timeout data hash   KEYS[3] due stream
    ARGV[1] at most this many timeouts
    ARGV[2] "now" in ms, or '' for the Redis server's clock (production)

  Output:
    {moved, next_due_ms, now_ms}   next_due_ms is -1 if nothing is scheduled
    due entries: s = process stream id, t = process type, p = payload, due = due ms
]]
-- @include "record_fields"
-- @include "now_ms"
-- @include "timeouts"
-- @include "timeout_process_type"

local zset, data, due_stream = KEYS[1], KEYS[2], KEYS[3]
local now = ARGV[2] ~= '' and tonumber(ARGV[2]) or now_ms()
local due = redis.call('ZRANGEBYSCORE', zset, '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for i = 1, #due, 2 do
  local id, due_ms = due[i], due[i + 1]
  local payload = redis.call('HGET', data, id)
  if payload then
    local stream_id = timeout_stream_id(id)
    local entry = {RECORD.stream, stream_id, RECORD.payload, payload, RECORD.due, due_ms}
    local process_type = timeout_process_type(payload)
    if process_type then
      -- Without t (a corrupt payload), every group gets it and dead-letters it.
      entry[#entry + 1] = RECORD.type
      entry[#entry + 1] = process_type
    end
    redis.call('XADD', due_stream, '*', unpack(entry))
    moved = moved + 1
  end
  cancel_timeout(zset, data, id)
end
local head = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
return {moved, #head == 0 and -1 or tonumber(head[2]), now}
