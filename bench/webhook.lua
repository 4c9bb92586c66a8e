-- wrk script: POST /v1/precall with a distinct phone number per request.
--
--   wrk -t2 -c32 -d10s --latency -s bench/webhook.lua http://127.0.0.1:18080 -- 2
--
-- The one argument after `--` is the thread count (-t), needed only with WEBHOOK_LIMIT.
--
-- Settings come from the environment (wrk passes no arguments to the top level):
--   WEBHOOK_KEY    API key                      (default bench-key)
--   WEBHOOK_AGENT  agentId                      (default bench-agent)
--   WEBHOOK_BASE   first number, 7 digits after +1555 (default 5000000)
--   WEBHOOK_LIMIT  stop each thread after this many answers (default 0 = run for -d);
--                  bench/run-all.sh --memory uses it to post exactly 1 000 000 contexts.
--                  wrk itself sleeps for the whole -d, so the last thread to finish sends
--                  wrk SIGINT (which ends that sleep); WEBHOOK_DONE_DIR (required with a
--                  limit, an empty folder) holds one marker file per finished thread
--   WEBHOOK_OUT    file to write the JSON summary to (default: stdout only)
-- Thread t posts +1555(BASE + t*STRIDE + n) for n = 0, 1, 2, ...: no number repeats
-- within a run of up to STRIDE requests per thread. Each body is ~200 bytes of context
-- besides agentId/phoneNumber, like bench/post_contexts.py's.

local key = os.getenv("WEBHOOK_KEY") or "bench-key"
local agent = os.getenv("WEBHOOK_AGENT") or "bench-agent"
local base = tonumber(os.getenv("WEBHOOK_BASE") or "5000000")
local limit = tonumber(os.getenv("WEBHOOK_LIMIT") or "0")
local out = os.getenv("WEBHOOK_OUT")
local done_dir = os.getenv("WEBHOOK_DONE_DIR")
local STRIDE = 1000000

local threads = {}
local next_id = 0

-- wrk's process id (threads share it), for the SIGINT that ends a limited run early.
local function wrk_pid()
   local f = io.open("/proc/self/stat")
   if not f then
      return nil
   end
   local pid = f:read("*n")
   f:close()
   return pid
end

local function exists(path)
   local f = io.open(path)
   if f then
      f:close()
      return true
   end
   return false
end

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function init(args)
   counter = 0
   answered = 0
   rejected = 0
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   wrk.headers["Authorization"] = "Bearer " .. key
   nthreads = tonumber(args[1] or "0") or 0
end

function request()
   local n = base + id * STRIDE + (counter % STRIDE)
   counter = counter + 1
   local digits = string.format("1555%07d", n % 10000000)
   local body = string.format(
      '{"agentId":"%s","phoneNumber":"+%s","customer_name":"Customer %s",' ..
      '"tier":"gold","account_number":"ACC-%s","last_order":{"id":"A-%s","status":"shipped"},' ..
      '"language":"en-US","note":"returning caller, prefers callbacks in the afternoon"}',
      agent, digits, digits:sub(-7), digits:sub(-8), digits:sub(-4))
   return wrk.format(nil, "/v1/precall", nil, body)
end

-- Only with a limit: a response() callback makes wrk parse every answer's headers, which
-- costs CPU the throughput run would rather leave to precall.
if limit > 0 then
   function response(status, headers, body)
      answered = answered + 1
      if status ~= 202 then
         rejected = rejected + 1
      end
      if answered == limit then
         wrk.thread:stop()
         if done_dir then
            -- Mark this thread done, then look at the others: whichever thread marks
            -- last sees every marker, so exactly the right moment sends the signal.
            local f = io.open(done_dir .. "/" .. id, "w")
            if f then
               f:close()
            end
            local all = true
            for t = 0, nthreads - 1 do
               if not exists(done_dir .. "/" .. t) then
                  all = false
               end
            end
            local pid = wrk_pid()
            if all and pid then
               -- system() ignores SIGINT process-wide while it waits for its child, so
               -- the signal is sent from the background once os.execute has returned.
               os.execute("(sleep 0.2; kill -INT " .. pid .. ") >/dev/null 2>&1 &")
            end
         end
      end
   end
end

function done(summary, latency, requests)
   local non2xx = summary.errors.status
   local rejected_total = 0
   for _, t in ipairs(threads) do
      rejected_total = rejected_total + (t:get("rejected") or 0)
   end
   local secs = summary.duration / 1e6
   local line = string.format(
      '{"kind": "webhook_ingest", "requests": %d, "seconds": %.3f, "req_per_s": %.1f, ' ..
      '"latency_ms_p50": %.3f, "latency_ms_p99": %.3f, "latency_ms_max": %.3f, ' ..
      '"errors_4xx_5xx": %d, "not_202": %d, "socket_errors": %d, "timeouts": %d, "threads": %d}',
      summary.requests, secs, summary.requests / secs,
      latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
      non2xx, rejected_total, summary.errors.connect + summary.errors.read + summary.errors.write,
      summary.errors.timeout, #threads)
   io.write(line .. "\n")
   if out then
      local f = io.open(out, "a")
      if f then
         f:write(line .. "\n")
         f:close()
      end
   end
end
