--[[
  The entries of one stream from an XREADGROUP reply, or {} when there are none.
  Redis replies {{stream, entries}} (or false when empty); fakeredis replies
  {stream, entries} (or {}), so both shapes are accepted.
]]
local function group_entries(reply)
  if not reply or #reply == 0 then
    return {}
  end
  if type(reply[1]) == 'table' then
    return reply[1][2]
  end
  return reply[2]
end
