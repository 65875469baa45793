-- A realistic mix of GA4 browser hits for wrk (used by bench/run).
--
--   60% page_view GETs (everything in the URL, empty body)
--   25% batched POSTs: shared parameters in the URL, 3 events as CRLF-separated body lines
--   15% purchases with two items (pr1, pr2) in the URL
--
-- Every hit has its own client id, a `dl` and a browser User-Agent (the Meta tag needs
-- both); half carry a Cookie header with `_ga`, `FPID` and `_fbp`; about one landing URL in
-- ten has an `fbclid`. Only events both tags send are used (no scroll/user_engagement).
--
-- Requests are built up front (POOL per thread) and replayed in turn, so wrk spends its
-- CPU on sending, not on string building. BENCH_DELAY_MS (optional) adds think time per
-- connection, which is how bench/run offers a fixed, moderate rate.

local POOL = 4000
local pool = {}
local pool_events = 0
local idx = 0
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
local threads = {}
local nthreads = 0

local UAS = {
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
  "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
  "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
}
local PAGES = { "p%2Ftrail-shoe", "p%2Fsocks", "c%2Fshoes", "", "blog%2Fhow-to-run", "p%2Fjacket", "search%3Fq%3Dshoes" }

function setup(thread)
  nthreads = nthreads + 1
  thread:set("thread_id", nthreads)
  table.insert(threads, thread)
end

local function visitor()
  -- A GA-shaped client id: <31-bit random>.<unix seconds>.
  return string.format("%d.%d", math.random(1000000000, 2147483647), 1764900000 + math.random(0, 99999))
end

local function common(cid, sid, page, fbclid)
  local dl = "https%3A%2F%2Fshop.example.com%2F" .. page
  if fbclid then
    if string.find(page, "%%3F") then
      dl = dl .. "%26fbclid%3DIwAR" .. math.random(100000, 999999)
    else
      dl = dl .. "%3Ffbclid%3DIwAR" .. math.random(100000, 999999)
    end
  end
  return "v=2&tid=G-BENCH00001&gtm=45je5ca1v9876543210za200&_p=" .. (1764912991000 + math.random(0, 999999))
    .. "&gcs=G111&gcd=13t3t3t3t5l1&npa=0&dma=0&cid=" .. cid .. "&ul=en-us&sr=1920x1080&_s=" .. math.random(1, 30)
    .. "&sid=" .. sid .. "&sct=" .. math.random(1, 9) .. "&seg=1&dl=" .. dl .. "&dt=Shop%20page"
end

local function build(i)
  local cid = visitor()
  local sid = tostring(1764912991 + math.random(0, 99999))
  local page = PAGES[math.random(1, #PAGES)]
  local fbclid = math.random() < 0.1
  local headers = {
    ["Host"] = "sgtm.example.com",
    ["User-Agent"] = UAS[math.random(1, #UAS)],
    ["Accept-Language"] = "en-US,en;q=0.9",
    ["Referer"] = "https://shop.example.com/",
  }
  if math.random() < 0.5 then
    local ts = string.match(cid, "%.(%d+)$")
    headers["Cookie"] = "_ga=GA1.1." .. cid .. "; FPID=FPID2.2." .. cid
      .. "; _fbp=fb.1." .. ts .. "000." .. math.random(1000000000, 2147483647)
      .. "; _ga_BENCH00001=GS2.1.s" .. sid .. "$o3$g1$t" .. sid .. "$j40$l0$h0"
  end
  local q = common(cid, sid, page, fbclid)
  local r = math.random()
  if r < 0.60 then
    return wrk.format("GET", "/g/collect?" .. q .. "&en=page_view&_et=" .. math.random(1, 5000), headers, nil), 1
  elseif r < 0.85 then
    headers["Content-Type"] = "text/plain;charset=UTF-8"
    local body = "en=view_item&cu=EUR&epn.value=59&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~pr59~qt1&_et=4210\r\n"
      .. "en=add_to_cart&cu=EUR&epn.value=59&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~pr59~qt1&_et=812\r\n"
      .. "en=begin_checkout&cu=EUR&epn.value=75&ep.coupon=SUMMER&_et=2306"
    return wrk.format("POST", "/g/collect?" .. q .. "&_c=0", headers, body), 3
  else
    headers["Content-Type"] = "text/plain;charset=UTF-8"
    local path = "/g/collect?" .. q .. "&uid=u_" .. math.random(1, 99999) .. "&en=purchase&_c=1&cu=EUR"
      .. "&ep.transaction_id=T-" .. i .. "-" .. math.random(1, 999999)
      .. "&epn.value=134&epn.tax=21.4&epn.shipping=4.9&ep.coupon=SUMMER"
      .. "&pr1=idSKU_123~nmTrail%20Shoe~brAcme~caShoes~c2Running~vablue~pr59~qt2~k0size~v042"
      .. "&pr2=idSKU_777~nmSocks~brAcme~caAccessories~pr16~qt1&_et=2311"
    return wrk.format("POST", path, headers, ""), 1
  end
end

function init(args)
  math.randomseed(os.time() * 7919 + (tonumber(thread_id) or 0) * 104729)
  for i = 1, POOL do
    local req, n = build(i)
    pool[i] = req
    pool_events = pool_events + n
  end
  -- A global, so `done` (in the main Lua state) can read it back with thread:get().
  pool_events_total = pool_events
end

function request()
  idx = idx % POOL + 1
  return pool[idx]
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local pool_reqs, pool_ev = 0, 0
  for _, t in ipairs(threads) do
    pool_reqs = pool_reqs + POOL
    pool_ev = pool_ev + (t:get("pool_events_total") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d p999_us=%d max_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d events_per_request=%.4f\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout,
    pool_reqs > 0 and pool_ev / pool_reqs or 0))
end
