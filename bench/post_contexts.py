#!/usr/bin/env python3
"""Post webhook contexts to precall for the benchmarks (python3 standard library only).

  post_contexts.py preload CSV [--count N] [--threads T] [--url U] [--key K] [--agent A]
      Posts one context per caller in a SIPp -inf CSV (the shared callers.csv), in
      parallel over keep-alive connections, before the load starts: the hit path.

  post_contexts.py follow RUN_DIR [--lag-ms L] [--calls N] [--csv CSV] [...]
      The held path. Tails the UAC's -trace_shortmsg log in RUN_DIR (SIPp writes it line
      by line) and posts each caller's context L ms after the UAC logged sending that
      caller's INVITE, so the INVITE is already held when the webhook lands and is
      released by it (X-Precall-Status: waited). Call-ID "n-PID@host" is SIPp call number
      n, which used CSV row (n - 1) mod rows (the CSV is SEQUENTIAL). Run it in the
      background from BENCH_PRELOAD; it exits after N posts or when the log goes quiet.

Every context is ~200 bytes of JSON besides agentId/phoneNumber (see context_body), and
a few fields become X-Precall-* headers on the forwarded INVITE.
"""
import argparse
import glob
import heapq
import http.client
import json
import os
import queue
import sys
import threading
import time
import urllib.parse

DEFAULT_URL = "http://127.0.0.1:18080"


def context_body(agent, number):
    """The JSON body for one caller: agentId, phoneNumber and ~200 bytes of context."""
    digits = number.lstrip("+")
    return json.dumps({
        "agentId": agent,
        "phoneNumber": number,
        "customer_name": f"Customer {digits[-7:]}",
        "tier": "gold",
        "account_number": f"ACC-{digits[-8:]}",
        "last_order": {"id": f"A-{digits[-4:]}", "status": "shipped"},
        "language": "en-US",
        "note": "returning caller, prefers callbacks in the afternoon",
    }, separators=(",", ":")).encode()


def read_callers(path):
    """Caller numbers from a SIPp -inf CSV (first line SEQUENTIAL/RANDOM, then `num;`)."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            line = line.strip()
            if i == 0 and line.upper() in ("SEQUENTIAL", "RANDOM", "USER"):
                continue
            if line:
                out.append(line.split(";")[0])
    return out


class Poster:
    """One keep-alive HTTP/1.1 connection posting to /v1/precall."""

    def __init__(self, url, key):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.headers = {"Content-Type": "application/json",
                        "Authorization": f"Bearer {key}"}
        self.conn = None

    def post(self, body):
        """Returns the HTTP status (0 on a connection error, after one retry)."""
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                self.conn.request("POST", "/v1/precall", body, self.headers)
                resp = self.conn.getresponse()
                resp.read()
                return resp.status
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 1:
                    return 0
        return 0


def cmd_preload(a):
    callers = read_callers(a.csv)
    if a.count:
        callers = callers[:a.count]
    statuses = {}
    lock = threading.Lock()

    def work(part):
        p = Poster(a.url, a.key)
        local = {}
        for number in part:
            s = p.post(context_body(a.agent, number))
            local[s] = local.get(s, 0) + 1
        with lock:
            for k, v in local.items():
                statuses[k] = statuses.get(k, 0) + v

    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(callers[i::a.threads],))
               for i in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.monotonic() - t0
    ok = statuses.get(202, 0)
    print(json.dumps({"posted": len(callers), "accepted": ok, "statuses": statuses,
                      "seconds": round(dt, 3), "per_s": round(len(callers) / dt, 1)}))
    return 0 if ok == len(callers) else 1


def cmd_follow(a):
    callers = read_callers(a.csv)
    log = open(a.log, "a") if a.log else sys.stderr
    deadline = time.monotonic() + a.start_timeout
    path = None
    while path is None:
        found = sorted(glob.glob(os.path.join(a.run_dir, "uac_*_shortmessages.log")))
        if found:
            path = found[0]
            break
        if time.monotonic() > deadline:
            print("follow: no UAC shortmsg log appeared", file=log)
            return 1
        time.sleep(0.001)

    work = queue.Queue()
    stats = {"posted": 0, "statuses": {}, "late_ms": []}
    lock = threading.Lock()

    def worker():
        p = Poster(a.url, a.key)
        while True:
            item = work.get()
            if item is None:
                return
            due, number = item
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            late = (time.time() - due) * 1000.0
            s = p.post(context_body(a.agent, number))
            with lock:
                stats["posted"] += 1
                stats["statuses"][s] = stats["statuses"].get(s, 0) + 1
                stats["late_ms"].append(late)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(a.threads)]
    for t in threads:
        t.start()

    seen = set()
    buf = b""
    last_data = time.monotonic()
    lag = a.lag_ms / 1000.0
    with open(path, "rb") as f:
        while len(seen) < a.calls:
            chunk = f.read(65536)
            if not chunk:
                if time.monotonic() - last_data > a.idle_timeout:
                    break
                time.sleep(0.0005)
                continue
            last_data = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parts = line.split(b"\t")
                if len(parts) < 7 or parts[3] != b"S" or not parts[6].startswith(b"INVITE "):
                    continue
                call_id = parts[4]
                if call_id in seen:
                    continue  # a retransmission
                seen.add(call_id)
                try:
                    n = int(call_id.split(b"-", 1)[0])
                    sent = float(parts[2])
                except ValueError:
                    continue
                number = callers[(n - 1) % len(callers)]
                # Call-IDs come in sending order, so the due times are ordered too.
                work.put((sent + lag, number))
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()
    late = sorted(stats["late_ms"])

    def pct(q):
        return round(late[int((len(late) - 1) * q)], 3) if late else None

    print(json.dumps({"invites_seen": len(seen), "posted": stats["posted"],
                      "statuses": stats["statuses"], "lag_ms": a.lag_ms,
                      "post_late_ms_p50": pct(0.5), "post_late_ms_p99": pct(0.99)}),
          file=log, flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--url", default=os.environ.get("BENCH_HTTP_URL", DEFAULT_URL))
        p.add_argument("--key", default="bench-key")
        p.add_argument("--agent", default="bench-agent")

    p = sub.add_parser("preload")
    p.add_argument("csv")
    p.add_argument("--count", type=int, default=0, help="first N callers only (0 = all)")
    p.add_argument("--threads", type=int, default=8)
    common(p)

    p = sub.add_parser("follow")
    p.add_argument("run_dir")
    p.add_argument("--csv", default=os.environ.get("BENCH_CALLERS_CSV", ""))
    p.add_argument("--lag-ms", type=float, default=10.0)
    p.add_argument("--calls", type=int, default=10000)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--idle-timeout", type=float, default=10.0)
    p.add_argument("--log", default="")
    common(p)

    a = ap.parse_args()
    if a.cmd == "preload":
        return cmd_preload(a)
    if not a.csv:
        ap.error("follow needs --csv or BENCH_CALLERS_CSV")
    return cmd_follow(a)


if __name__ == "__main__":
    sys.exit(main())
