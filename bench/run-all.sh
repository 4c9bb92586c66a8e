#!/usr/bin/env bash
# precall against Kamailio, in one go: builds release, then runs on this machine
#   - SIPp UAC -> UAS direct (the floor), Kamailio, and precall on the hit, fallback and
#     held paths (../shared/bench/run.sh, the same SIPp load for each, alternated over
#     --rounds so drift hits both sides),
#   - the release-lag probe at low and at high load (bench/release_lag.py),
#   - webhook ingest throughput (wrk + bench/webhook.lua),
#   - RSS with 10 000 calls held at once (bench/memory.py held),
#   - optionally max CPS (--max-cps), 1 000 000 cached contexts (--memory), a perf
#     profile of precall on the hit path (--perf),
# and prints a table of ratios against Kamailio plus the raw figures.
#
# usage: bench/run-all.sh [--quick] [--rate CPS] [--calls N] [--rounds N] [--max-cps]
#                         [--max-cps-rates "1000 2000 ..."] [--memory] [--perf]
#                         [--lag-calls N] [--bg-rate CPS] [--held-calls N] [--no-build]
#                         [--only PARTS]
#
#   --quick          small counts (a CI smoke run: checks that everything still works)
#   --rate, --calls  SIPp load per run (default 500 cps, 10000 calls)
#   --rounds         how many times the five runs are repeated, alternating (default 2)
#   --max-cps        also step the rate up for kamailio and precall-hit (max_cps.sh)
#   --memory         also post 1 000 000 contexts and read RSS (about 1-2 minutes)
#   --perf           also profile precall on the hit path (perf record; report in the
#                    session folder)
#   --lag-calls      release-lag probe calls per phase (default 1000)
#   --bg-rate        SIPp hit load during the high-load lag phase (default 1000 cps)
#   --held-calls     calls held at once for the memory figure (default 10000)
#   --no-build       use the existing target/release/precall
#   --only LIST      only these parts, comma-separated: runs, lag, webhook, held,
#                    memory, maxcps, perf (default: runs,lag,webhook,held plus the
#                    ones asked for with --memory, --max-cps, --perf)
#
# Run from anywhere; paths are relative to the repository root. The shared harness is
# ../shared/bench beside the repository (BENCH_HARNESS overrides). Results go to
# BENCH_OUT (default target/bench): runs/ holds each run's logs, and
# sessions/<timestamp>/ this invocation's results.jsonl, report.md and report.json.
# Uses UDP 5060/5061/5070/5072 and TCP 18080 on 127.0.0.1 (waits while the UDP ones are busy).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
HARNESS="${BENCH_HARNESS:-$ROOT/../shared/bench}"
HARNESS="$(cd "$HARNESS" 2>/dev/null && pwd)" || {
  echo "run-all.sh: shared harness not found (expected ../shared/bench beside the repo; set BENCH_HARNESS)" >&2
  exit 1
}
LIB="$HARNESS/lib/benchlib.py"
export BENCH_OUT="${BENCH_OUT:-$ROOT/target/bench}"
mkdir -p "$BENCH_OUT"
BENCH_OUT="$(cd "$BENCH_OUT" && pwd)"

QUICK=0
RATE=500
CALLS=10000
ROUNDS=2
MAX_CPS=0
MAX_CPS_RATES=""
MEMORY=0
PERF=0
LAG_CALLS=1000
BG_RATE=1000
HELD_CALLS=10000
BUILD=1
ONLY=""
SET_RATE="" SET_CALLS="" SET_ROUNDS="" SET_LAG="" SET_BG="" SET_HELD=""

usage() { sed -n '2,37p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) QUICK=1; shift ;;
    --rate) SET_RATE="$2"; shift 2 ;;
    --calls) SET_CALLS="$2"; shift 2 ;;
    --rounds) SET_ROUNDS="$2"; shift 2 ;;
    --max-cps) MAX_CPS=1; shift ;;
    --max-cps-rates) MAX_CPS=1; MAX_CPS_RATES="$2"; shift 2 ;;
    --memory) MEMORY=1; shift ;;
    --perf) PERF=1; shift ;;
    --lag-calls) SET_LAG="$2"; shift 2 ;;
    --bg-rate) SET_BG="$2"; shift 2 ;;
    --held-calls) SET_HELD="$2"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "run-all.sh: unknown argument: $1" >&2; usage ;;
  esac
done
if [[ $QUICK -eq 1 ]]; then
  RATE=200 CALLS=400 ROUNDS=1 LAG_CALLS=100 BG_RATE=200 HELD_CALLS=1000
fi
RATE="${SET_RATE:-$RATE}" CALLS="${SET_CALLS:-$CALLS}" ROUNDS="${SET_ROUNDS:-$ROUNDS}"
LAG_CALLS="${SET_LAG:-$LAG_CALLS}" BG_RATE="${SET_BG:-$BG_RATE}" HELD_CALLS="${SET_HELD:-$HELD_CALLS}"
for v in RATE CALLS ROUNDS LAG_CALLS BG_RATE HELD_CALLS; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || { echo "run-all.sh: bad ${v,,}: ${!v}" >&2; exit 2; }
done
PARTS="runs,lag,webhook,held"
[[ $MEMORY -eq 1 ]] && PARTS+=",memory"
[[ $MAX_CPS -eq 1 ]] && PARTS+=",maxcps"
[[ $PERF -eq 1 ]] && PARTS+=",perf"
[[ -n "$ONLY" ]] && PARTS="$ONLY"
want() { [[ ",$PARTS," == *",$1,"* ]]; }
if [[ -z "$MAX_CPS_RATES" ]]; then
  if [[ $QUICK -eq 1 ]]; then MAX_CPS_RATES="200 500"; else MAX_CPS_RATES="1000 1500 2000 2500 3000 3500 4000 5000 6000"; fi
fi

# Callers: the shared CSV (10 000 numbers); preloading only what a run uses keeps
# --quick quick. Runs of more calls reuse numbers, so then all 10 000 are posted.
PRELOAD_COUNT=$(( CALLS < 10000 ? CALLS : 10000 ))
WRK_SECS=10
[[ $QUICK -eq 1 ]] && WRK_SECS=2
BG_SECS=20
[[ $QUICK -eq 1 ]] && BG_SECS=8

need() { command -v "$1" >/dev/null || { echo "run-all.sh: $1 not found ($2)" >&2; exit 1; }; }
need sipp "apt-get install sip-tester"
need kamailio "apt-get install kamailio"
need wrk "apt-get install wrk"
need python3 "python3"
need setsid "util-linux"
want perf && need perf "apt-get install linux-perf"

SESSION="$BENCH_OUT/sessions/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$SESSION"
export BENCH_RESULTS="$SESSION/results.jsonl"
: > "$BENCH_RESULTS"
LOG="$SESSION/log.txt"
T_START=$(date +%s)

say() { echo "[run-all $(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

PRECALL="$ROOT/target/release/precall"
HTTP_URL="http://127.0.0.1:18080"
export BENCH_HTTP_URL="$HTTP_URL"

# ------------------------------------------------------------------ processes we start
STARTED_PID=""   # a precall started by this script (not by run.sh)
BG_PID=""        # a background run.sh

# alive PID: running (a zombie, which `kill -0` still accepts, is not)
alive() {
  local state
  state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [[ -n "$state" && "$state" != Z ]]
}

stop_pid() {
  local pid="$1" i
  [[ -n "$pid" ]] || return 0
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$BG_PID"
  stop_pid "$STARTED_PID"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The shared run.sh refuses to start while any UDP socket has port 5060, 5061 or 5070,
# whatever its address, and other people's tests on this machine bind such ports on
# other loopback addresses (127.0.0.2:5060 ...) for a few seconds: wait for them.
wait_ports_free() {
  local i p busy
  for i in $(seq 1 120); do
    busy=""
    for p in 5060 5061 5070 5072; do
      python3 "$LIB" port-bound "$p" && busy+=" $p"
    done
    [[ -z "$busy" ]] && return 0
    [[ $i -eq 1 ]] && say "waiting for UDP port(s)$busy to be free"
    sleep 0.5
  done
  say "UDP port(s)$busy still busy after 60 s"
  return 1
}

port_free_or_die() {
  wait_ports_free || { echo "run-all.sh: UDP ports busy (an earlier run still alive?)" >&2; exit 1; }
  # connect_ex is 0 when something accepts on the port
  if python3 -c 'import socket,sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", 18080)) == 0)'; then :; else
    echo "run-all.sh: TCP 127.0.0.1:18080 is busy" >&2; exit 1
  fi
}

# start_precall CONFIG LOGFILE [ENV=VALUE...]: runs precall in its own session and waits
# until it answers /readyz and holds UDP 5060 itself; STARTED_PID is its PID. A start that fails (a port still held by a process on its way out) is retried.
start_precall() {
  local cfg="$1" logf="$2"; shift 2
  local attempt i
  for attempt in 1 2 3; do
    wait_ports_free
    env "$@" setsid "$PRECALL" run -c "$cfg" >"$logf" 2>&1 </dev/null &
    STARTED_PID=$!
    for i in $(seq 1 150); do
      alive "$STARTED_PID" || break
      if python3 - "$HTTP_URL" <<'EOF' 2>/dev/null && [[ "$(python3 bench/pid_of_port.py 5060)" == "$STARTED_PID" ]]
import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=1).status == 200 else 1)
EOF
      then return 0; fi
      sleep 0.1
    done
    say "precall did not start (attempt $attempt): $(tail -n 1 "$logf")"
    stop_pid "$STARTED_PID"; STARTED_PID=""
    sleep 2
  done
  echo "run-all.sh: precall would not start; see $logf" >&2
  exit 1
}
stop_precall() { stop_pid "$STARTED_PID"; STARTED_PID=""; }

# one_run NAME [run.sh args...]: one shared-harness run; its JSON line lands in results.jsonl
one_run() {
  local name="$1"; shift
  local line attempt
  for attempt in 1 2; do
    wait_ports_free || true
    if line="$("$HARNESS/run.sh" --name "$name" "$@" 2>>"$LOG")"; then
      break
    fi
    say "$name: run.sh failed (attempt $attempt; see $LOG)"
    [[ $attempt -eq 2 ]] && return 1
  done
  say "$(python3 bench/report.py --line "$line")"
}

PRELOAD_HIT="python3 '$ROOT/bench/post_contexts.py' preload \"\$BENCH_CALLERS_CSV\" --count $PRELOAD_COUNT"
run_kamailio() { one_run kamailio --rate "$RATE" --calls "$CALLS" -- kamailio -f "$HARNESS/kamailio.cfg" -DD -E; }
run_direct() { one_run direct --rate "$RATE" --calls "$CALLS" --direct; }
run_hit() {
  BENCH_PRELOAD="$PRELOAD_HIT" one_run precall-hit --rate "$RATE" --calls "$CALLS" -- "$PRECALL" run -c bench/precall-hit.toml
}
run_fallback() { one_run precall-fallback --rate "$RATE" --calls "$CALLS" -- "$PRECALL" run -c bench/precall-fallback.toml; }
run_held() {
  # The follower tails this run's UAC trace and posts each context 10 ms after its INVITE
  # went out; it runs in the background and exits after the last call.
  BENCH_PRELOAD="setsid python3 '$ROOT/bench/post_contexts.py' follow \"\$BENCH_RUN_DIR\" --calls $CALLS --lag-ms 10 --log \"\$BENCH_RUN_DIR/follow.log\" </dev/null >/dev/null 2>&1 &" \
    one_run precall-held --rate "$RATE" --calls "$CALLS" -- "$PRECALL" run -c bench/precall-held.toml
}

# ------------------------------------------------------------------ build
if [[ $BUILD -eq 1 ]]; then
  say "cargo build --release"
  cargo build --release 2>&1 | tail -n 2 | tee -a "$LOG" >&2
fi
[[ -x "$PRECALL" ]] || { echo "run-all.sh: $PRECALL missing (drop --no-build)" >&2; exit 1; }
for cfg in bench/precall-hit.toml bench/precall-fallback.toml bench/precall-held.toml bench/precall-probe.toml; do
  "$PRECALL" check -c "$cfg" >/dev/null
done
port_free_or_die
say "session $SESSION: rate $RATE cps, $CALLS calls, $ROUNDS round(s)"

# ------------------------------------------------------------------ SIPp runs, alternated
FAILED=0
want runs && for r in $(seq 1 "$ROUNDS"); do
  say "round $r/$ROUNDS"
  # Kamailio and the hit path side by side, their order flipped every round.
  if (( r % 2 == 1 )); then order=(kamailio hit direct fallback held); else order=(hit kamailio held fallback direct); fi
  for what in "${order[@]}"; do
    "run_$what" || FAILED=1
  done
done

# ------------------------------------------------------------------ release lag
if want lag; then
say "release lag, low load: $LAG_CALLS sequential held calls"
start_precall bench/precall-probe.toml "$SESSION/lag-low.log"
python3 bench/release_lag.py --phase low --calls "$LAG_CALLS" --caller-base 3000000 \
  | tee -a "$BENCH_RESULTS" >&2 || FAILED=1
stop_precall

say "release lag, high load: the same during a $BG_RATE cps SIPp hit load"
BG_CALLS=$(( BG_RATE * BG_SECS ))
wait_ports_free || true
BENCH_PRELOAD="python3 '$ROOT/bench/post_contexts.py' preload \"\$BENCH_CALLERS_CSV\"" \
  "$HARNESS/run.sh" --name precall-hit-bg --rate "$BG_RATE" --calls "$BG_CALLS" \
  -- "$PRECALL" run -c bench/precall-probe.toml >"$SESSION/bg.json" 2>>"$LOG" &
BG_PID=$!
# wait until the UAC is up (its port bound), then one more second of load
for i in $(seq 1 600); do
  python3 "$LIB" port-bound 5061 && break
  kill -0 "$BG_PID" 2>/dev/null || break
  sleep 0.1
done
sleep 1
if kill -0 "$BG_PID" 2>/dev/null; then
  python3 bench/release_lag.py --phase high --calls "$LAG_CALLS" --caller-base 4000000 \
    | tee -a "$BENCH_RESULTS" >&2 || FAILED=1
  if ! python3 "$LIB" port-bound 5061; then
    say "WARNING: the background load ended before the probe did; raise --bg-rate duration"
  fi
else
  say "background load did not start (see $LOG)"; FAILED=1
fi
wait "$BG_PID" || FAILED=1
BG_PID=""
fi

# ------------------------------------------------------------------ webhook ingest
if want webhook; then
say "webhook ingest: wrk -t2 -c32 -d${WRK_SECS}s"
start_precall bench/precall-hit.toml "$SESSION/webhook.log"
CPU0="$(python3 "$LIB" cpu "$STARTED_PID" | cut -d' ' -f1)"
WRK_LINE="$(WEBHOOK_BASE=5000000 wrk -t2 -c32 -d"${WRK_SECS}s" --latency -s bench/webhook.lua "$HTTP_URL" -- 2 \
  | tee "$SESSION/wrk.txt" | grep '^{' || true)"
CPU1="$(python3 "$LIB" cpu "$STARTED_PID" | cut -d' ' -f1)"
if [[ -n "$WRK_LINE" ]]; then
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); cpu=float(sys.argv[3])-float(sys.argv[2]); r.update(name="webhook-ingest", proxy_cpu_s=round(cpu,3), cpu_us_per_request=round(cpu*1e6/max(1,r["requests"]),1), concurrency=32); print(json.dumps(r))' \
    "$WRK_LINE" "$CPU0" "$CPU1" | tee -a "$BENCH_RESULTS" >&2
else
  say "wrk printed no summary (see $SESSION/wrk.txt)"; FAILED=1
fi
stop_precall
fi

# ------------------------------------------------------------------ memory
if want held; then
say "memory: $HELD_CALLS calls held at once"
start_precall bench/precall-probe.toml "$SESSION/memory-held.log"
python3 bench/memory.py held --pid "$STARTED_PID" --calls "$HELD_CALLS" \
  | tee -a "$BENCH_RESULTS" >&2 || FAILED=1
stop_precall
fi

if want memory; then
  # At the default info level precall logs a line per webhook: 1 M lines is ~250 MB of
  # log, so this one run logs warnings only.
  say "memory: 1000000 cached contexts of ~200 bytes (wrk)"
  start_precall bench/precall-probe.toml "$SESSION/memory-contexts.log" RUST_LOG=warn
  python3 bench/memory.py contexts --pid "$STARTED_PID" --count 1000000 \
    | tee -a "$BENCH_RESULTS" >&2 || FAILED=1
  stop_precall
fi

# ------------------------------------------------------------------ max CPS
if want maxcps; then
  # The shared max_cps.sh is run one rate at a time, Kamailio and precall alternating at
  # each rate (the machine's noise then hits both), and a step that could not start
  # (ports briefly held by someone else's test) is retried instead of ending the climb.
  # Each side stops at its first failing rate; the steps are then put together into one
  # max_cps line per side, like max_cps.sh's own.
  say "max CPS: kamailio and precall-hit, alternating, rates $MAX_CPS_RATES"
  declare -A climbing=([kamailio]=1 [precall-hit]=1)
  for what in kamailio precall-hit; do : > "$SESSION/maxcps-$what.jsonl"; done
  for rate in $MAX_CPS_RATES; do
    for what in kamailio precall-hit; do
      [[ ${climbing[$what]} -eq 1 ]] || continue
      if [[ $what == kamailio ]]; then
        cmd=(kamailio -f "$HARNESS/kamailio.cfg" -DD -E); pre=""
      else
        cmd=("$PRECALL" run -c bench/precall-hit.toml)
        pre="python3 '$ROOT/bench/post_contexts.py' preload \"\$BENCH_CALLERS_CSV\""
      fi
      line=""
      for attempt in 1 2 3; do
        wait_ports_free || true
        line="$(BENCH_RESULTS="" BENCH_PRELOAD="$pre" "$HARNESS/max_cps.sh" --name "$what" --rates "$rate" -- "${cmd[@]}" 2>>"$LOG")" || true
        [[ "$line" == *'"run.sh failed'* || -z "$line" ]] || break
        say "max CPS $what at $rate cps: the run did not start (attempt $attempt)"
      done
      echo "$line" >> "$SESSION/maxcps-$what.jsonl"
      verdict="$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["steps"][-1]["verdict"] if r["steps"] else r["stop_reason"])' "$line" 2>/dev/null || echo "no result")"
      say "max CPS $what at $rate cps: $verdict"
      [[ "$verdict" == PASS ]] || climbing[$what]=0
    done
    [[ ${climbing[kamailio]} -eq 1 || ${climbing[precall-hit]} -eq 1 ]] || break
  done
  for what in kamailio precall-hit; do
    python3 - "$what" "$SESSION/maxcps-$what.jsonl" <<'EOF' | tee -a "$BENCH_RESULTS" >/dev/null
import json, sys, time
name, path = sys.argv[1], sys.argv[2]
steps, best, stop, criteria = [], 0, "all steps passed", None
for line in open(path):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    criteria = r.get("criteria", criteria)
    steps += r["steps"]
    if r["max_cps"] and r["max_cps"] > best and all(s["verdict"] == "PASS" for s in steps):
        best = r["max_cps"]
    if r["stop_reason"] != "all steps passed":
        stop = r["stop_reason"]
print(json.dumps({"name": name, "kind": "max_cps", "max_cps": best, "criteria": criteria,
                  "stop_reason": stop, "steps": steps, "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
EOF
    say "$what: max $(tail -n 1 "$BENCH_RESULTS" | python3 -c 'import json,sys; print(json.load(sys.stdin)["max_cps"])') cps"
  done
fi

# ------------------------------------------------------------------ perf profile
if want perf; then
  # perf attaches to the running proxy for the load phase only (not start-up, not the
  # preload), so the profile is what a call costs. This run is not part of the table.
  say "perf: profiling precall on the hit path during the load (not part of the table)"
  wait_ports_free || true
  BENCH_PRELOAD="$PRELOAD_HIT" BENCH_RESULTS="" \
    "$HARNESS/run.sh" --name precall-hit-perf --rate "$RATE" --calls "$CALLS" \
    -- "$PRECALL" run -c bench/precall-hit.toml >/dev/null 2>>"$LOG" &
  BG_PID=$!
  for i in $(seq 1 600); do
    python3 "$LIB" port-bound 5061 && break
    kill -0 "$BG_PID" 2>/dev/null || break
    sleep 0.1
  done
  if PROXY_PID="$(python3 bench/pid_of_port.py 5060)"; then
    PERF_SECS=$(( CALLS / RATE > 2 ? CALLS / RATE - 1 : 1 ))
    perf record -F 1999 --call-graph dwarf,16384 -o "$SESSION/perf.data" -p "$PROXY_PID" \
      -- sleep "$PERF_SECS" >>"$LOG" 2>&1 || FAILED=1
    perf report -i "$SESSION/perf.data" --stdio --children --sort symbol -g none \
      --percent-limit 0.5 2>/dev/null > "$SESSION/perf-report.txt" || true
    say "perf report (inclusive %, by symbol): $SESSION/perf-report.txt"
  else
    say "perf: no proxy found on UDP 5060"; FAILED=1
  fi
  wait "$BG_PID" || FAILED=1
  BG_PID=""
fi

# ------------------------------------------------------------------ report
ELAPSED=$(( $(date +%s) - T_START ))
python3 bench/report.py "$SESSION" --elapsed "$ELAPSED" --quick "$QUICK" --check || FAILED=1
say "done in ${ELAPSED}s; results in $SESSION"
exit "$FAILED"
