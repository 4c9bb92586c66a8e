#!/usr/bin/env python3
"""Release-lag probe (python3 standard library only).

How long after the webhook's 202 does a held INVITE reach the agent? For each call:

  caller socket --INVITE--> precall            (probe-agent's number: nothing cached, long
  caller socket <--100---- precall              fallback, so the call is held)
  POST /v1/precall (keep-alive http.client)    t_sent
  ... select() on the HTTP socket and on the agent socket, timestamping each as it
  becomes readable:  202 first byte -> t_202,  forwarded INVITE -> t_invite
  agent socket --486--> precall --486--> caller --ACK--> precall  (call torn down)

and reports, over all calls (after a warm-up), the distribution of

  lag_ms          t_invite - t_202   (negative: the INVITE reached the agent before the
                                       client had the 202; precall releases the call
                                       before it answers the webhook)
  post_to_invite_ms  t_invite - t_sent  (the whole webhook -> agent path)
  post_to_202_ms     t_202 - t_sent     (the webhook round trip, for scale)

Calls run one after the other (one held at a time): "low load" is this alone; "high
load" is this while a SIPp hit load runs through the same precall (bench/run-all.sh
starts that). Use bench/precall-probe.toml: its probe-agent (+15550199) sends to
127.0.0.1:5072, where this probe listens. Prints one JSON line.
"""
import argparse
import http.client
import json
import os
import random
import select
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from post_contexts import context_body  # noqa: E402


# Kernel receive timestamps (Linux SO_TIMESTAMPNS = SCM_TIMESTAMPNS = 35; Python 3.11 does not
# name it): both the UDP INVITE and the TCP 202 are stamped by the kernel as they arrive, so
# the lag does not depend on how fast this script's loop wakes up.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def kernel_ts(ancdata):
    """CLOCK_REALTIME seconds from an SCM_TIMESTAMPNS control message, else None."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("qq", data[:16])
            return sec + nsec / 1e9
    return None


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def summary(vals):
    s = sorted(vals)
    if not s:
        return None
    r = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {"p50": r(pct(s, 0.5)), "p99": r(pct(s, 0.99)), "max": r(s[-1]),
            "min": r(s[0]), "mean": r(sum(s) / len(s))}


def headers_of(msg):
    """(first line, {lower-case name: [values]}) of a SIP message (bytes)."""
    head = msg.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    lines = head.split("\r\n")
    out = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            out.setdefault(name.strip().lower(), []).append(value.strip())
    return lines[0], out


def header_lines(msg, name):
    """Raw header lines named `name` (case-insensitive, long form only)."""
    head = msg.split(b"\r\n\r\n", 1)[0]
    return [line for line in head.split(b"\r\n")[1:]
            if line.split(b":", 1)[0].strip().lower() == name.lower().encode()]


class Probe:
    def __init__(self, a):
        self.a = a
        host, port = a.sip.rsplit(":", 1)
        self.proxy = (host, int(port))
        self.caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.caller.bind(("127.0.0.1", a.caller_port))
        self.caller_addr = self.caller.getsockname()
        self.agent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.agent.bind(("127.0.0.1", a.agent_port))
        self.agent.setblocking(False)
        self.agent.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        u = a.url.split("//", 1)[-1].split("/", 1)[0]
        h, p = u.rsplit(":", 1)
        self.http = (h, int(p))
        self.conn = None
        self.tag = f"{random.getrandbits(32):x}"

    def connect(self):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(*self.http, timeout=10)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        return self.conn

    def invite(self, i, number):
        branch = f"z9hG4bK-lag-{self.tag}-{i}"
        call_id = f"lag-{self.tag}-{i}@127.0.0.1"
        sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
               "t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
        h, p = self.caller_addr
        msg = (f"INVITE sip:{self.a.called}@{self.proxy[0]}:{self.proxy[1]} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {h}:{p};branch={branch}\r\n"
               f"Max-Forwards: 70\r\n"
               f"From: <sip:{number}@{h}:{p}>;tag=c{i}\r\n"
               f"To: <sip:{self.a.called}@{self.proxy[0]}:{self.proxy[1]}>\r\n"
               f"Call-ID: {call_id}\r\n"
               f"CSeq: 1 INVITE\r\n"
               f"Contact: <sip:{number}@{h}:{p}>\r\n"
               f"Content-Type: application/sdp\r\n"
               f"Content-Length: {len(sdp)}\r\n\r\n{sdp}")
        return msg.encode(), branch, call_id

    def recv_caller(self, timeout, want):
        """Next message on the caller socket whose first line starts with `want`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.caller], [], [], left)
            if not r:
                return None
            data, _ = self.caller.recvfrom(65535)
            if data.startswith(want):
                return data

    def drain_agent(self):
        while True:
            try:
                self.agent.recvfrom(65535)
            except BlockingIOError:
                return

    def one(self, i, number):
        """One held call. Returns (lag, post_to_invite, post_to_202, status) or raises."""
        inv, branch, call_id = self.invite(i, number)
        self.caller.sendto(inv, self.proxy)
        if self.recv_caller(2.0, b"SIP/2.0 100") is None:
            raise RuntimeError("no 100 Trying")
        # precall sends the 100 before it registers the call's watch, so a webhook posted
        # the instant the 100 arrives can find no waiter, be cached, and the INVITE then
        # "hits" it. A short pause makes the call really held; such hits are still counted.
        if self.a.settle_ms > 0:
            time.sleep(self.a.settle_ms / 1000.0)
        conn = self.connect()
        body = context_body(self.a.agent, number)
        headers = {"Content-Type": "application/json",
                   "Authorization": f"Bearer {self.a.key}"}
        t_sent = time.time()
        conn.request("POST", "/v1/precall", body, headers)
        t_202 = t_inv = None
        fwd = None
        deadline = time.monotonic() + 5.0
        while t_202 is None or t_inv is None:
            waits = []
            if t_202 is None:
                waits.append(conn.sock)
            if t_inv is None:
                waits.append(self.agent)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("timed out waiting for the 202 or the forwarded INVITE")
            r, _, _ = select.select(waits, [], [], left)
            now = time.time()
            for s in r:
                if s is self.agent:
                    try:
                        data, anc, _, src = self.agent.recvmsg(65535, 256)
                    except BlockingIOError:
                        continue
                    if data.startswith(b"INVITE ") and call_id.encode() in data:
                        t_inv, fwd, fwd_src = kernel_ts(anc) or now, data, src
                else:
                    # Peek: http.client reads the response itself below.
                    _, anc, _, _ = conn.sock.recvmsg(1, 256, socket.MSG_PEEK)
                    t_202 = kernel_ts(anc) or now
        resp = conn.getresponse()
        resp.read()
        if resp.status != 202:
            raise RuntimeError(f"webhook answered {resp.status}")
        _, hdrs = headers_of(fwd)
        status = (hdrs.get("x-precall-status") or ["?"])[0]
        # The agent turns the call down: 486 back to precall, which ACKs it and relays it.
        vias = b"\r\n".join(header_lines(fwd, "via"))
        to = header_lines(fwd, "to")[0] + b";tag=agent" + str(i).encode()
        resp486 = (b"SIP/2.0 486 Busy Here\r\n" + vias + b"\r\n" +
                   header_lines(fwd, "from")[0] + b"\r\n" + to + b"\r\n" +
                   header_lines(fwd, "call-id")[0] + b"\r\n" +
                   header_lines(fwd, "cseq")[0] + b"\r\nContent-Length: 0\r\n\r\n")
        self.agent.sendto(resp486, fwd_src)
        final = self.recv_caller(2.0, b"SIP/2.0 486")
        if final is not None:
            to_line = header_lines(final, "to")[0]
            h, p = self.caller_addr
            ack = (f"ACK sip:{self.a.called}@{self.proxy[0]}:{self.proxy[1]} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {h}:{p};branch={branch}\r\n"
                   f"Max-Forwards: 70\r\n"
                   f"From: <sip:{number}@{h}:{p}>;tag=c{i}\r\n").encode() + to_line + (
                   f"\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
                   ).encode()
            self.caller.sendto(ack, self.proxy)
        self.drain_agent()
        return ((t_inv - t_202) * 1000.0, (t_inv - t_sent) * 1000.0,
                (t_202 - t_sent) * 1000.0, status)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=20, help="calls run first and not counted")
    ap.add_argument("--phase", default="low", help="label in the output (low, high)")
    ap.add_argument("--sip", default="127.0.0.1:5060")
    ap.add_argument("--agent-port", type=int, default=5072)
    ap.add_argument("--caller-port", type=int, default=0)
    ap.add_argument("--url", default=os.environ.get("BENCH_HTTP_URL", "http://127.0.0.1:18080"))
    ap.add_argument("--key", default="probe-key")
    ap.add_argument("--agent", default="probe-agent")
    ap.add_argument("--called", default="+15550199")
    ap.add_argument("--settle-ms", type=float, default=1.0,
                    help="pause between the 100 and the POST, so the call is held")
    ap.add_argument("--caller-base", type=int, default=3000000,
                    help="callers are +1555 followed by 7 digits from here (distinct per run)")
    a = ap.parse_args()

    probe = Probe(a)
    lags, totals, rtts, statuses, errors = [], [], [], {}, {}
    failed_in_a_row = 0
    t0 = time.monotonic()
    for i in range(a.warmup + a.calls):
        number = f"+1555{a.caller_base + i:07d}"
        try:
            lag, total, rtt, status = probe.one(i, number)
        except (RuntimeError, OSError, http.client.HTTPException) as e:
            errors[str(e)] = errors.get(str(e), 0) + 1
            if probe.conn is not None:
                probe.conn.close()
                probe.conn = None
            failed_in_a_row += 1
            if failed_in_a_row >= 10:
                errors["aborted: 10 calls in a row failed"] = 1
                break
            continue
        failed_in_a_row = 0
        if i < a.warmup:
            continue
        statuses[status] = statuses.get(status, 0) + 1
        if status != "waited":
            continue  # not released by the webhook: no release lag to measure
        lags.append(lag)
        totals.append(total)
        rtts.append(rtt)
    out = {
        "name": f"release-lag-{a.phase}",
        "kind": "release_lag",
        "calls": a.calls,
        "measured": len(lags),
        "statuses": statuses,
        "errors": errors,
        "lag_ms": summary(lags),
        "invite_before_202": sum(1 for x in lags if x < 0),
        "post_to_invite_ms": summary(totals),
        "post_to_202_ms": summary(rtts),
        "seconds": round(time.monotonic() - t0, 2),
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(out, separators=(", ", ": ")))
    return 0 if lags and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
