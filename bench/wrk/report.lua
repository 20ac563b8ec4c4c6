-- wrk script used by bench/run.py.
--
-- BENCH_PATHS  one path ("/read") or a weighted mix ("/read:90,/slow?ms=50:10")
-- At the end it prints one line "BENCH_JSON {...}" with the summary and the
-- latency percentiles (microseconds); errors_status counts non-2xx/3xx.

local spec = os.getenv("BENCH_PATHS") or "/read"
local paths, weights, total = {}, {}, 0
for item in string.gmatch(spec, "[^,]+") do
  local p, w = string.match(item, "^(.-):(%d+)$")
  if not p then p, w = item, "1" end
  total = total + tonumber(w)
  table.insert(paths, p)
  table.insert(weights, total)
end

local prebuilt = {}

function init(args)
  math.randomseed(os.time() + math.floor((os.clock() * 1e6) % 1e6))
  for i, p in ipairs(paths) do
    prebuilt[i] = wrk.format("GET", p)
  end
end

if #paths == 1 then
  wrk.path = paths[1]
else
  function request()
    local r = math.random() * total
    for i, w in ipairs(weights) do
      if r <= w then return prebuilt[i] end
    end
    return prebuilt[#prebuilt]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
