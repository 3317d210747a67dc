-- wrk script: POST a callback or a webhook, each request with the next unused id.
-- "webhook_url" posts the provider's own payload (no key in it) to /webhook/<key>, the URL
-- in {{webhook_url}}; the URL wrk is given must end in "/webhook/".
-- Environment: BENCH_MODE (callback | webhook | webhook_url | bare | telegram | twilio), BENCH_IDS (file
-- of ids, or for twilio of "signature<TAB>form body", one per fixed-width line), BENCH_FIRST
-- (first line to use; for telegram the first update_id), BENCH_PER_THREAD (lines per
-- thread), BENCH_LINE (line width), BENCH_SECRET (telegram's secret token header).
-- done() prints one "BENCH {json}" line that bench/common.py reads.

local mode = os.getenv("BENCH_MODE") or "callback"
local ids_path = os.getenv("BENCH_IDS") or ""
local first = tonumber(os.getenv("BENCH_FIRST") or "0")
local per_thread = tonumber(os.getenv("BENCH_PER_THREAD") or "0")
local line = tonumber(os.getenv("BENCH_LINE") or "25")
local secret = os.getenv("BENCH_SECRET") or ""

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  ids = {}
  n = 0
  if ids_path ~= "" and per_thread > 0 then
    local f = assert(io.open(ids_path, "rb"))
    f:seek("set", (first + tid * per_thread) * line)
    local data = f:read(per_thread * line) or ""
    f:close()
    for id in data:gmatch("[^\n]+") do
      ids[#ids + 1] = id:match("^(.-)%s*$")  -- without the padding
    end
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if mode == "telegram" then
    wrk.headers["X-Telegram-Bot-Api-Secret-Token"] = secret
  end
end

local function next_id()
  n = n + 1
  if #ids == 0 then
    return string.format("bare%020d", n)
  end
  -- past the end: reuse the last id (answers 409); common.py reports running out
  return ids[math.min(n, #ids)]
end

function request()
  if mode == "telegram" then
    n = n + 1
    local uid = first + tid * 100000000 + n
    return wrk.format(nil, nil, nil, '{"update_id":' .. uid .. ',"message":{"message_id":1,' ..
      '"from":{"id":' .. uid .. ',"is_bot":false,"first_name":"U"},"chat":{"id":' .. uid ..
      ',"type":"private","first_name":"U"},"date":1700000000,"text":"hi"}}')
  end
  local id = next_id()
  if mode == "twilio" then
    local sig, form = id:match("^([^\t]+)\t(.*)$")
    return wrk.format(nil, nil, {["Content-Type"] = "application/x-www-form-urlencoded",
                                 ["X-Twilio-Signature"] = sig}, form)
  end
  local body
  if mode == "webhook_url" then
    body = '{"order":{"f0":"A-' .. n .. '","f1":"shipped",' ..
      '"f2":"x2","f3":"x3","f4":"x4","f5":"x5","f6":"x6","f7":"x7","f8":"x8","f9":"x9"}}'
    return wrk.format(nil, wrk.path .. id, nil, body)
  elseif mode == "webhook" then
    body = '{"conversation_key":"' .. id .. '","order":{"f0":"A-' .. n .. '","f1":"shipped",' ..
      '"f2":"x2","f3":"x3","f4":"x4","f5":"x5","f6":"x6","f7":"x7","f8":"x8","f9":"x9"}}'
  else
    body = '{"executionId":"' .. id .. '","success":true,"data":{"ref":"R-' .. n .. '"}}'
  end
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  local used = {}
  for i, t in ipairs(threads) do
    used[i] = t:get("n")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"non2xx":%d,"errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d,"used":[%s]}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50.0), latency:percentile(99.0), latency.max, table.concat(used, ",")))
end
