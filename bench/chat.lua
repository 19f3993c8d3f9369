-- wrk script for the apibox benchmark: POST one chat request, write a JSON summary.
--
--   BENCH_MODEL     "model" of the request (default bench-model)
--   BENCH_STREAM=1  ask for a stream with usage (stream_options.include_usage)
--   BENCH_HEADERS   extra headers, "Name: value|Name2: value2" (the apibox key)
--   BENCH_JSON_OUT  file for the summary (default: stdout, after "BENCH_JSON ")
--
-- wrk times each request to its last byte, so a stream's latency is the whole stream.
-- "requests" counts every completed response; "err_status" the ones with status >= 400
-- (wrk counts status > 399), so 2xx/3xx = requests - err_status.

local model = os.getenv("BENCH_MODEL") or "bench-model"
local streaming = os.getenv("BENCH_STREAM") == "1"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
for item in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^|]+") do
  local name, value = string.match(item, "^%s*([^:]+):%s*(.-)%s*$")
  if name then wrk.headers[name] = value end
end

-- a small, realistic chat request (about 450 bytes): a system and a user message
local parts = {
  '{"model":"', model, '","messages":[',
  '{"role":"system","content":"You are a concise assistant for an engineering team. ',
  'Answer in plain words."},',
  '{"role":"user","content":"In two sentences: why does a team that calls several LLM ',
  'providers put one gateway in front of them, and why count usage per API key?"}],',
  '"temperature":0.2,"max_tokens":64',
}
if streaming then
  parts[#parts + 1] = ',"stream":true,"stream_options":{"include_usage":true}'
end
parts[#parts + 1] = '}'
wrk.body = table.concat(parts)

function done(summary, latency, requests)
  local errors = summary.errors
  local seconds = summary.duration / 1e6
  local line = string.format(
    '{"requests":%d,"duration_s":%.3f,"rps":%.1f,"bytes":%d,"lat_mean_ms":%.3f,' ..
    '"lat_p50_ms":%.3f,"lat_p90_ms":%.3f,"lat_p99_ms":%.3f,"lat_max_ms":%.3f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}',
    summary.requests, seconds, summary.requests / seconds, summary.bytes, latency.mean / 1000,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, errors.connect, errors.read, errors.write, errors.status, errors.timeout)
  local path = os.getenv("BENCH_JSON_OUT")
  if path and path ~= "" then
    local f = assert(io.open(path, "w"))
    f:write(line, "\n")
    f:close()
  else
    io.write("BENCH_JSON ", line, "\n")
  end
end
