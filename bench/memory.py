#!/usr/bin/env python3
"""Memory figures for a running precall (python3 standard library, plus wrk for contexts).

  memory.py held --pid PID [--calls 10000] [--sip 127.0.0.1:5060] [--called +15550199]
      Sends CALLS INVITEs from distinct callers to an agent with a long fallback and
      nothing cached (bench/precall-probe.toml's probe-agent), so every one is held at
      once; waits for all their 100 Trying, reads VmRSS, then CANCELs every call and
      reads VmRSS again. Prints one JSON line.

  memory.py contexts --pid PID [--count 1000000] [--url http://127.0.0.1:18080]
      Posts COUNT distinct contexts of ~200 bytes (wrk + bench/webhook.lua, 2 threads),
      then reads VmRSS. Prints one JSON line.

RSS is read from /proc/PID/status before and after; "per call/context" is the difference
divided by the count, so it includes allocator slack and the store's table growth.
"""
import argparse
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def settle_rss(pid, seconds=1.0):
    time.sleep(seconds)
    return rss_kb(pid)


def cmd_held(a):
    host, port = a.sip.rsplit(":", 1)
    proxy = (host, int(port))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    lh, lp = sock.getsockname()
    tag = f"{os.getpid():x}{int(time.time()) & 0xffff:x}"
    sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
           "t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")

    def request(method, i):
        number = f"+1555{a.caller_base + i:07d}"
        body = sdp if method == "INVITE" else ""
        ctype = "Content-Type: application/sdp\r\n" if body else ""
        return (f"{method} sip:{a.called}@{host}:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {lh}:{lp};branch=z9hG4bK-mem-{tag}-{i}\r\n"
                f"Max-Forwards: 70\r\n"
                f"From: <sip:{number}@{lh}:{lp}>;tag=m{i}\r\n"
                f"To: <sip:{a.called}@{host}:{port}>\r\n"
                f"Call-ID: mem-{tag}-{i}@127.0.0.1\r\n"
                f"CSeq: 1 {method}\r\n"
                f"Contact: <sip:{number}@{lh}:{lp}>\r\n"
                f"{ctype}Content-Length: {len(body)}\r\n\r\n{body}").encode()

    def fields(data):
        """(Call-ID, CSeq, To line) of a response."""
        cid = cseq = to = None
        for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            name = line.split(b":", 1)[0].strip().lower()
            if name in (b"call-id", b"i"):
                cid = line.split(b":", 1)[1].strip()
            elif name == b"cseq":
                cseq = line.split(b":", 1)[1].strip()
            elif name in (b"to", b"t"):
                to = line
        return cid, cseq, to

    def ack_for(data, cid, to):
        """ACK for a 487 (hop by hop, same branch), so precall stops retransmitting it."""
        i = int(cid.split(b"@", 1)[0].rsplit(b"-", 1)[1])
        number = f"+1555{a.caller_base + i:07d}"
        return (f"ACK sip:{a.called}@{host}:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {lh}:{lp};branch=z9hG4bK-mem-{tag}-{i}\r\n"
                f"Max-Forwards: 70\r\n"
                f"From: <sip:{number}@{lh}:{lp}>;tag=m{i}\r\n").encode() + to + (
                f"\r\nCall-ID: {cid.decode()}\r\nCSeq: 1 ACK\r\n"
                f"Content-Length: 0\r\n\r\n").encode()

    def pump(method, want, window):
        """Send one `method` per call, at most `window` unanswered; count the calls
        answered with a status line starting with `want` (for CSeq `method`)."""
        got = set()
        sent = 0
        quiet = 0
        deadline = time.monotonic() + a.timeout
        while len(got) < a.calls and time.monotonic() < deadline:
            while sent < a.calls and sent - len(got) < window:
                try:
                    sock.sendto(request(method, sent), proxy)
                except BlockingIOError:
                    break
                sent += 1
            r, _, _ = select.select([sock], [], [], 0.05)
            if not r:
                quiet += 1
                # Lost datagrams are not retransmitted: give up after 2 s of silence.
                if sent >= a.calls and quiet > 40:
                    break
                continue
            quiet = 0
            while True:
                try:
                    data, _ = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                cid, cseq, to = fields(data)
                if cid is None or cseq is None:
                    continue
                if data.startswith(b"SIP/2.0 487") and to is not None:
                    sock.sendto(ack_for(data, cid, to), proxy)
                elif data.startswith(want) and cseq.endswith(method.encode()):
                    got.add(cid)
        return sent, len(got)

    before = settle_rss(a.pid, 0.5)
    t0 = time.monotonic()
    sent, held = pump("INVITE", b"SIP/2.0 100", a.window)
    burst_s = time.monotonic() - t0
    during = settle_rss(a.pid, 1.0)
    out = {
        "name": "memory-held",
        "kind": "memory",
        "calls": a.calls,
        "invites_sent": sent,
        "held": held,
        "burst_seconds": round(burst_s, 3),
        "rss_kb_before": before,
        "rss_kb_held": during,
        "bytes_per_held_call": round((during - before) * 1024 / held) if held else None,
    }
    if not a.no_cancel:
        _, cancelled = pump("CANCEL", b"SIP/2.0 200", a.window)
        out["cancelled"] = cancelled
        out["rss_kb_after_cancel"] = settle_rss(a.pid, 1.0)
    out["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(json.dumps(out, separators=(", ", ": ")))
    return 0 if held == a.calls else 1


def cmd_contexts(a):
    wrk = shutil.which("wrk")
    if wrk is None:
        print("memory.py: wrk not found (apt-get install wrk)", file=sys.stderr)
        return 1
    threads = 2
    per_thread = (a.count + threads - 1) // threads
    before = settle_rss(a.pid, 0.5)
    with tempfile.TemporaryDirectory() as done_dir:
        env = dict(os.environ, WEBHOOK_LIMIT=str(per_thread), WEBHOOK_DONE_DIR=done_dir,
                   WEBHOOK_BASE=str(a.base), WEBHOOK_KEY=a.key, WEBHOOK_AGENT=a.agent)
        t0 = time.monotonic()
        res = subprocess.run(
            [wrk, f"-t{threads}", "-c32", f"-d{a.max_seconds}s", "-s",
             os.path.join(HERE, "webhook.lua"), a.url, "--", str(threads)],
            env=env, capture_output=True, text=True)
        secs = time.monotonic() - t0
    summary = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    after = settle_rss(a.pid, 1.0)
    posted = summary.get("requests", 0)
    out = {
        "name": "memory-contexts",
        "kind": "memory",
        "contexts": posted,
        "seconds": round(secs, 1),
        "rss_kb_before": before,
        "rss_kb_after": after,
        "bytes_per_context": round((after - before) * 1024 / posted) if posted else None,
        "errors": summary.get("errors_4xx_5xx", 0) + summary.get("not_202", 0),
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(out, separators=(", ", ": ")))
    return 0 if posted >= a.count and out["errors"] == 0 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("held")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--calls", type=int, default=10000)
    p.add_argument("--window", type=int, default=500, help="INVITEs in flight without a 100")
    p.add_argument("--sip", default="127.0.0.1:5060")
    p.add_argument("--called", default="+15550199")
    p.add_argument("--caller-base", type=int, default=6000000)
    p.add_argument("--timeout", type=float, default=50.0)
    p.add_argument("--no-cancel", action="store_true")
    p = sub.add_parser("contexts")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--count", type=int, default=1000000)
    p.add_argument("--url", default=os.environ.get("BENCH_HTTP_URL", "http://127.0.0.1:18080"))
    p.add_argument("--key", default="bench-key")
    p.add_argument("--agent", default="bench-agent")
    p.add_argument("--base", type=int, default=1000000)
    p.add_argument("--max-seconds", type=int, default=600)
    a = ap.parse_args()
    return cmd_held(a) if a.cmd == "held" else cmd_contexts(a)


if __name__ == "__main__":
    sys.exit(main())
