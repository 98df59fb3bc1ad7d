-- message_id.lua: message_id(raw) -> the task id of a raw kombu payload ('' if none).
local function message_id(m)
  local ok, p = pcall(cjson.decode, m)
  if ok and type(p) == 'table' then
    if type(p.headers) == 'table' and p.headers.id then return tostring(p.headers.id) end
    if type(p.properties) == 'table' and p.properties.correlation_id then
      return tostring(p.properties.correlation_id)
    end
  end
  return ''
end
