--[[
  Move one log entry to the shard's dead letters: add the dead letter, then
  acknowledge the entry for its group (releasing the stream like ack_batch.lua).
  Both happen or neither does, so an entry is never both lost and unrecorded.

  Input:
    KEYS[1] shard log   KEYS[2] owners   KEYS[3] in-flight counts   KEYS[4] dead letters
    ARGV[1] group   ARGV[2] entry id   ARGV[3] stream id ('' if none)
    ARGV[4] dead-letter stream max length (approximate)
    ARGV[5 ..] the dead letter's field/value pairs

  Output:
    the id of the dead-letter entry
]]
-- @include "release_entry"

local fields = {}
for i = 5, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
release_entry(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])
return id
