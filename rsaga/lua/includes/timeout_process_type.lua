--[[
  The process type of a stored timeout payload, or nil if it is not one.
  A payload is the msgpack array of a TimeoutPayload whose first element is the
  process type, a name of at most 100 characters: msgspec writes it as a
  fixstr (up to 31 bytes) or a str8. Reading that header here routes a timeout
  without decoding the payload (cmsgpack is not available everywhere).
]]
local function timeout_process_type(payload)
  local array, header = string.byte(payload, 1, 2)
  if not array or array < 0x90 or array > 0x9f or not header then
    return nil
  end
  if header >= 0xa0 and header <= 0xbf then
    return string.sub(payload, 3, 2 + header - 0xa0)
  end
  if header == 0xd9 then
    local length = string.byte(payload, 3)
    return length and string.sub(payload, 4, 3 + length) or nil
  end
  return nil
end
