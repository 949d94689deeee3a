-- REST error responses become the documented WellTegra body:
--   {"error": "<code>", "message": "...", "details": [{"field": ..., "error": ...}],
--    "retry_after_seconds": N}
-- built from the google.rpc.Status the transcoder prints (ErrorInfo.reason, BadRequest,
-- RetryInfo), or from Envoy's own plain-text replies (unparseable JSON, 404, 413, 503).
-- Native gRPC calls and successful responses are returned before the body is touched, so they
-- are never buffered.

local META = "welltegra.error_body"

-- The documented code for a status when the gateway sent no ErrorInfo.
local CODE_FOR_STATUS = {
  ["400"] = "validation_error",
  ["401"] = "invalid_token",
  ["403"] = "forbidden",
  ["404"] = "not_found",
  ["405"] = "method_not_allowed",
  ["413"] = "payload_too_large",
  ["415"] = "unsupported_media_type",
  ["429"] = "rate_limit_exceeded",
  ["500"] = "internal_error",
  ["502"] = "service_unavailable",
  ["503"] = "service_unavailable",
  ["504"] = "gateway_timeout",
}

-- Reads the JSON string whose opening quote is at s[i]; returns its text as written (still
-- escaped, so it can be copied into our JSON as it is) and the index after its closing quote.
local function json_string(s, i)
  local j = i + 1
  while j <= #s do
    local c = s:sub(j, j)
    if c == "\\" then
      j = j + 2
    elseif c == '"' then
      return s:sub(i + 1, j - 1), j + 1
    else
      j = j + 1
    end
  end
  return nil, j
end

-- The string value of the first `"key":"..."` at or after `from`.
local function string_field(s, key, from)
  local _, quote = s:find('"' .. key .. '":"', from or 1, true)
  if not quote then
    return nil
  end
  return (json_string(s, quote))
end

local ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

-- Whether s is well-formed UTF-8 (LuaJIT has no utf8 library).
local function valid_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local size = (c < 0x80 and 1) or (c >= 0xC2 and c < 0xE0 and 2)
      or (c >= 0xE0 and c < 0xF0 and 3) or (c >= 0xF0 and c < 0xF5 and 4)
    if not size then
      return false
    end
    for k = i + 1, i + size - 1 do
      local b = s:byte(k)
      if not b or b < 0x80 or b > 0xBF then
        return false
      end
    end
    i = i + size
  end
  return true
end

-- Plain text as the inside of a JSON string. Envoy's messages may quote the client's bytes,
-- which need not be UTF-8; those become "?" so the body stays valid JSON.
local function escape(text)
  if not valid_utf8(text) then
    text = text:gsub("[\128-\255]", "?")
  end
  return (text:gsub('[%c"\\]', function(c)
    return ESCAPES[c] or string.format("\\u%04x", c:byte())
  end))
end

-- A google.rpc.Status printed by the transcoder: code, message, violations, retry delay.
local function from_status(body)
  local message = string_field(body, "message") or ""
  local code
  local info = body:find("google.rpc.ErrorInfo", 1, true)
  if info then
    code = string_field(body, "reason", info)
  end
  local violations = {}
  local bad = body:find("google.rpc.BadRequest", 1, true)
  if bad then
    local at = bad
    while true do
      local _, quote = body:find('"field":"', at, true)
      if not quote then
        break
      end
      local field, after = json_string(body, quote)
      local description = string_field(body, "description", after) or ""
      violations[#violations + 1] = { field = field, error = description }
      at = after
    end
  end
  local retry
  local retry_info = body:find("google.rpc.RetryInfo", 1, true)
  if retry_info then
    local delay = string_field(body, "retry_delay", retry_info)
      or string_field(body, "retryDelay", retry_info)
    local seconds = delay and tonumber(delay:match("^([%d%.]+)s$"))
    if seconds then
      retry = math.max(1, math.ceil(seconds))
    end
  end
  return code, message, violations, retry
end

-- Envoy's own plain-text replies. The transcoder's JSON parse errors name the field, as in
-- "data_points[0].value: invalid value \"abc\" for type TYPE_DOUBLE".
local function from_text(status, body)
  -- ": Root element must be a message." names no field: drop the empty path.
  local text = body:gsub("^[%s:]+", ""):gsub("%s+$", ""):sub(1, 500)
  local violations = {}
  if status == "400" then
    local field, problem = text:match("^([%w_%.%[%]]+):%s*(.+)$")
    if field and field:find("[%._%[]") then
      violations[1] = { field = escape(field), error = escape(problem) }
    end
    if text == "" then
      text = "Invalid request"
    end
  end
  return nil, escape(text), violations, nil
end

function envoy_on_request(handle)
  -- Only the REST API (/v1/...) gets the documented body; other paths (native gRPC, the
  -- development OAuth issuer's RFC 6749 errors) keep their own.
  local path = handle:headers():get(":path") or ""
  local content_type = handle:headers():get("content-type") or ""
  if path:sub(1, 4) == "/v1/" and content_type:sub(1, 16) ~= "application/grpc" then
    handle:streamInfo():dynamicMetadata():set(META, "rest", true)
  end
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(META)
  if not (meta and meta.rest) then
    return
  end
  local status = handle:headers():get(":status") or "200"
  if status:sub(1, 1) == "2" then
    return
  end
  local content_type = handle:headers():get("content-type") or ""
  local buffer = handle:body()
  local body = buffer and buffer:getBytes(0, buffer:length()) or ""
  local code, message, violations, retry
  if content_type:find("json", 1, true) and body:find('"code"', 1, true) then
    code, message, violations, retry = from_status(body)
  else
    code, message, violations, retry = from_text(status, body)
  end
  if code == nil or code == "" then
    code = CODE_FOR_STATUS[status] or "error"
  end
  -- gRPC has one code for "too much" (RESOURCE_EXHAUSTED, 429); a message over the size limit
  -- is 413 to an HTTP client, since waiting does not help.
  if code == "payload_too_large" then
    status = "413"
  end
  local parts = { '{"error":"', escape(code), '","message":"', message, '"' }
  if #violations > 0 then
    local items = {}
    for i, v in ipairs(violations) do
      items[i] = '{"field":"' .. v.field .. '","error":"' .. v.error .. '"}'
    end
    parts[#parts + 1] = ',"details":[' .. table.concat(items, ",") .. "]"
  end
  if retry then
    parts[#parts + 1] = ',"retry_after_seconds":' .. retry
  end
  parts[#parts + 1] = "}"
  local documented = table.concat(parts)
  if buffer then
    buffer:setBytes(documented)
  end
  -- Fetched again: a headers handle taken before the body was read is no longer valid.
  local headers = handle:headers()
  headers:replace(":status", status)
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#documented))
  headers:remove("grpc-status")
  headers:remove("grpc-message")
  headers:remove("grpc-status-details-bin")
  if retry then
    headers:replace("retry-after", tostring(retry))
  end
  if status == "401" then
    headers:replace("www-authenticate", 'Bearer realm="welltegra", error="invalid_token"')
  end
end
