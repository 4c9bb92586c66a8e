#!/usr/bin/env python3
"""Soak test for precall: a steady mixed load, then a check that everything returns to
baseline. Run through scripts/soak.sh (which builds the release binary); the integration
test `soak::short_soak_returns_to_baseline` runs a short version against the debug binary.

Load, all aimed at 127.0.0.1 only, for the whole run:
  hits       SIPp uac.xml batches; the contexts of each batch are posted just before it
  waited     a raw UAC: INVITE, then the webhook 50-250 ms later releases the held call
  fallback   a raw UAC: INVITE, no webhook: forwarded after fallback_wait_ms
  cancel     a raw UAC: INVITE, CANCEL while held: 200 + 487, ACK
  garbage    random bytes, broken SIP, scanner OPTIONS/REGISTER, stray responses over
             UDP; garbage and half messages over TCP; bad webhooks (401, 400)
The agent is a SIPp uas.xml.

Sampled every few seconds: precall's RSS and open file descriptors (/proc), and its
`stats` log line (held calls, INVITE transactions in memory, calls waiting, contexts
cached, TCP connections). At the end the load stops and, once transactions have lingered
out (64*T1) and unused contexts expired (ttl_secs), the script asserts that held, calls,
waiting, contexts and inbound TCP connections are 0 again, the descriptors are back to
their count before the load, RSS is not above its warmed-up level (30% + 10 MiB slack for
the allocator), and (almost) every call succeeded. Exit status 0 when all hold.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
AGENT_NUMBER = "+14155550100"
API_KEY = "soak-key"


def free_port(kind=socket.SOCK_DGRAM):
    for _ in range(50):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            u.close()
            t.close()
    raise RuntimeError("no free port")


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = {}
        self.failed = {}
        self.reasons = []
        self.slow_connections = 0

    def add(self, flow, ok, reason=""):
        with self.lock:
            d = self.ok if ok else self.failed
            d[flow] = d.get(flow, 0) + 1
            if not ok and len(self.reasons) < 20:
                self.reasons.append(f"{flow}: {reason}")


# ----------------------------------------------------------------------------- precall


class Precall:
    def __init__(self, binary, workdir, uas_port, t1_ms, ttl_secs, stats_secs):
        self.sip = free_port()
        self.http = free_port()
        self.config = os.path.join(workdir, "precall.toml")
        with open(self.config, "w") as f:
            f.write(f"""
[sip]
listen = ["udp:127.0.0.1:{self.sip}", "tcp:127.0.0.1:{self.sip}"]
trusted_peers = ["127.0.0.0/8"]
t1_ms = {t1_ms}
tcp_idle_secs = 5
stats_secs = {stats_secs}

[http]
listen = "127.0.0.1:{self.http}"
rate_limit_per_sec = 0

[store]
ttl_secs = {ttl_secs}

[[agents]]
id = "soak"
api_keys = ["{API_KEY}"]
numbers = ["{AGENT_NUMBER}"]
upstream = "sip:127.0.0.1:{uas_port};transport=udp"
fallback_wait_ms = 400
defaults = {{ customer_name = "there" }}
""")
        self.log_path = os.path.join(workdir, "precall.log")
        self.log = open(self.log_path, "w")
        env = dict(os.environ, RUST_LOG="info", NO_COLOR="1")
        self.proc = subprocess.Popen([binary, "run", "-c", self.config], stdout=subprocess.DEVNULL,
                                     stderr=self.log, env=env)
        deadline = time.time() + 20
        while time.time() < deadline:
            if "precall ready" in self.read_log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError("precall exited:\n" + self.read_log())
            time.sleep(0.1)
        raise RuntimeError("precall did not start:\n" + self.read_log())

    def read_log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def last_stats(self):
        lines = [l for l in self.read_log().splitlines() if " stats " in l]
        if not lines:
            return {}
        return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", lines[-1])}

    def stats_count(self):
        return sum(1 for l in self.read_log().splitlines() if " stats " in l)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return -1

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def post(self, phone, fields=None, key=API_KEY, raw=None):
        body = raw if raw is not None else json.dumps(
            dict({"agentId": "soak", "phoneNumber": phone}, **(fields or {}))).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}/v1/precall", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ------------------------------------------------------------------------- a raw UAC


class RawUac:
    """One UDP socket, one call at a time, RFC 3261 timers simplified (T1 retransmits)."""

    def __init__(self, precall, t1):
        self.p = precall
        self.t1 = t1
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.local = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.target = ("127.0.0.1", precall.sip)

    def request(self, method, ruri, branch, call_id, caller, cseq, to, routes=(), body=""):
        lines = [f"{method} {ruri} SIP/2.0",
                 f"Via: SIP/2.0/UDP {self.local};branch={branch};rport",
                 "Max-Forwards: 70"]
        lines += [f"Route: {r}" for r in routes]
        lines += [f"From: <sip:{caller}@{self.local}>;tag=f{call_id[:8]}",
                  f"To: {to}",
                  f"Call-ID: {call_id}",
                  f"CSeq: {cseq} {method}",
                  f"Contact: <sip:{caller}@{self.local}>",
                  "User-Agent: soak"]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()

    def send(self, data):
        self.sock.sendto(data, self.target)

    def recv(self, call_id, timeout, want=None):
        """The next response for call_id (and status in `want`), or None."""
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                return None
            text = data.decode("utf-8", "replace")
            m = re.match(r"SIP/2\.0 (\d{3})", text)
            if not m or f"Call-ID: {call_id}\r\n" not in text:
                continue
            code = int(m.group(1))
            if want is None or code in want:
                return code, text

    def transaction(self, data, call_id, want, timeout=8.0):
        """Sends `data`, retransmitting every T1 (doubling) until a response in `want`."""
        deadline = time.time() + timeout
        interval = self.t1
        while time.time() < deadline:
            self.send(data)
            got = self.recv(call_id, min(interval, deadline - time.time()), want)
            if got:
                return got
            interval = min(interval * 2, 4.0)
        return None

    def call(self, flow, caller, counters):
        call_id = "%s-%x@soak" % (flow, random.getrandbits(48))
        branch = "z9hG4bK%x" % random.getrandbits(48)
        to = f"<sip:{AGENT_NUMBER}@127.0.0.1:{self.p.sip}>"
        ruri = f"sip:{AGENT_NUMBER}@127.0.0.1:{self.p.sip}"
        sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n"
        invite = self.request("INVITE", ruri, branch, call_id, caller, 1, to, body=sdp)
        if not self.transaction(invite, call_id, {100}, timeout=5):
            return counters.add(flow, False, "no 100")
        if flow == "cancel":
            time.sleep(random.uniform(0.02, 0.1))
            cancel = self.request("CANCEL", ruri, branch, call_id, caller, 1, to)
            if not self.transaction(cancel, call_id, {200}):
                return counters.add(flow, False, "no 200 for CANCEL")
            got = self.recv(call_id, 5, {487})
            if not got:
                return counters.add(flow, False, "no 487")
            to_487 = re.search(r"\r\nTo: ([^\r]*)", got[1]).group(1)
            self.send(self.request("ACK", ruri, branch, call_id, caller, 1, to_487))
            return counters.add(flow, True)
        if flow == "waited":
            time.sleep(random.uniform(0.05, 0.25))
            status, answer = self.p.post(caller, {"customer_name": "Soak", "flow": "waited"})
            if status != 202:
                return counters.add(flow, False, f"webhook {status}")
        got = self.recv(call_id, 10, {200})
        if not got:
            return counters.add(flow, False, "no 200")
        text = got[1]
        to_200 = re.search(r"\r\nTo: ([^\r]*)", text).group(1)
        contact = re.search(r"\r\nContact: <([^>]*)>", text).group(1)
        routes = re.findall(r"\r\nRecord-Route: ([^\r]*)", text)
        ack = self.request("ACK", contact, "z9hG4bK%x" % random.getrandbits(48), call_id, caller, 1, to_200,
                           routes)
        self.send(ack)
        time.sleep(random.uniform(0.0, 0.2))
        bye = self.request("BYE", contact, "z9hG4bK%x" % random.getrandbits(48), call_id, caller, 2, to_200,
                           routes)
        if not self.transaction(bye, call_id, {200}):
            return counters.add(flow, False, "no 200 for BYE")
        counters.add(flow, True)


def uac_worker(precall, t1, flow, rate, stop, counters, numbers):
    uac = RawUac(precall, t1)
    period = 1.0 / rate
    next_at = time.time()
    while not stop.is_set():
        caller = next(numbers)
        try:
            uac.call(flow, caller, counters)
        except Exception as e:  # a broken answer is a failed call, not a dead worker
            counters.add(flow, False, repr(e))
        next_at += period
        delay = next_at - time.time()
        if delay > 0:
            stop.wait(delay)
        else:
            next_at = time.time()


def numbers_from(base):
    n = 0
    while True:
        yield "+1415%07d" % (base + n % 100000)
        n += 1


# ------------------------------------------------------------------------------ SIPp


def sipp_uas(workdir, port):
    shutil.copy(os.path.join(ROOT, "sipp-scenarios", "uas.xml"), workdir)
    out = open(os.path.join(workdir, "uas.screen"), "w")
    return subprocess.Popen(["sipp", "-sf", "uas.xml", "-i", "127.0.0.1", "-p", str(port), "-nostdin",
                             "-trace_err", "-error_file", "uas_errors.log"],
                            cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def hits_worker(precall, workdir, rate, stop, counters):
    """SIPp batches of `batch` calls; the batch's contexts are posted first (hits)."""
    shutil.copy(os.path.join(ROOT, "sipp-scenarios", "uac.xml"), workdir)
    batch = max(4, int(rate * 5))
    base = 6_000_000
    round_no = 0
    while not stop.is_set():
        callers = ["+1415%07d" % (base + (round_no * batch + i) % 100000) for i in range(batch)]
        round_no += 1
        for c in callers:
            status, _ = precall.post(c, {"customer_name": "Hit", "flow": "hit"})
            if status != 202:
                counters.add("hit", False, f"webhook {status}")
        csv = os.path.join(workdir, "hits.csv")
        with open(csv, "w") as f:
            f.write("SEQUENTIAL\n" + "".join(f"{c};\n" for c in callers))
        port = free_port()
        r = subprocess.run(["sipp", "-sf", "uac.xml", "-inf", "hits.csv", "-s", AGENT_NUMBER,
                            "-i", "127.0.0.1", "-p", str(port), "-m", str(batch), "-r", str(max(1, int(rate))),
                            "-nostdin", "-timeout", "60", "-timeout_error", "-recv_timeout", "10000",
                            "-trace_err", "-error_file", "hits_errors.log", "-trace_stat", "-stf", "hits_stat.csv",
                            f"127.0.0.1:{precall.sip}"],
                           cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        stat = os.path.join(workdir, "hits_stat.csv")
        ok = failed = None
        try:
            with open(stat) as f:
                rows = [l.strip().split(";") for l in f if l.strip()]
            head, last = rows[0], rows[-1]
            ok = int(last[head.index("SuccessfulCall(C)")])
            failed = int(last[head.index("FailedCall(C)")])
            os.remove(stat)
        except Exception:
            pass
        if ok is None:
            ok, failed = (batch, 0) if r.returncode == 0 else (0, batch)
        with counters.lock:
            counters.ok["hit"] = counters.ok.get("hit", 0) + ok
            if failed:
                counters.failed["hit"] = counters.failed.get("hit", 0) + failed
                counters.reasons.append(f"hit: SIPp batch had {failed} failed calls (exit {r.returncode})")


# --------------------------------------------------------------------------- garbage


SCANNER = ("OPTIONS sip:100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK{n}\r\n"
           "From: <sip:100@127.0.0.1>;tag={n}\r\nTo: <sip:100@127.0.0.1>\r\nCall-ID: {n}@scan\r\n"
           "CSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\nContent-Length: 0\r\n\r\n")
REGISTER = ("REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK{n};rport\r\n"
            "From: <sip:{n}@127.0.0.1>;tag={n}\r\nTo: <sip:{n}@127.0.0.1>\r\nCall-ID: {n}@reg\r\n"
            "CSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n")
BROKEN = ("INVITE sip:{a}@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK{n};rport\r\n"
          "From: <sip:+14155559999@127.0.0.1>;tag={n}\r\nTo: <sip:{a}@127.0.0.1>\r\nCall-ID: {n}@broken\r\n"
          "CSeq: 1 INVITE\r\nContent-Length: 9999\r\n\r\nv=0\r\n")
STRAY = ("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKnotours{n}\r\nFrom: <sip:a@b>;tag=1\r\n"
         "To: <sip:c@d>;tag=2\r\nCall-ID: {n}@stray\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


def garbage_worker(precall, rate, stop, counters):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    target = ("127.0.0.1", precall.sip)
    n = 0
    period = 1.0 / rate
    next_tcp = time.time()
    next_slow = time.time()
    slow = []  # half messages left hanging: precall must close them (tcp_idle_secs)
    while not stop.is_set():
        if time.time() >= next_slow:
            next_slow = time.time() + 10
            try:
                s = socket.create_connection(("127.0.0.1", precall.sip), timeout=2)
                s.sendall(b"INVITE sip:" + AGENT_NUMBER.encode() + b"@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP x")
                slow.append(s)
                counters.slow_connections += 1
            except OSError:
                pass
        n += 1
        kind = n % 5
        if kind == 0:
            data = os.urandom(random.randint(1, 1400))
        elif kind == 1:
            data = SCANNER.format(n=n).encode()
        elif kind == 2:
            data = REGISTER.format(n=n).encode()
        elif kind == 3:
            data = BROKEN.format(n=n, a=AGENT_NUMBER).encode()
        else:
            data = STRAY.format(n=n, port=precall.sip).encode()
        try:
            sock.sendto(data, target)
        except OSError:
            pass
        try:  # drain answers (405, 400)
            while True:
                sock.recvfrom(65536)
        except OSError:
            pass
        if time.time() >= next_tcp:
            next_tcp = time.time() + 2
            try:
                t = socket.create_connection(("127.0.0.1", precall.sip), timeout=2)
                t.sendall(os.urandom(200) if n % 2 else BROKEN.format(n=n, a=AGENT_NUMBER).encode()[:60])
                t.close()
            except OSError:
                pass
            status, _ = precall.post("+14155559999", key="wrong-key")
            if status != 401:
                counters.add("garbage", False, f"a wrong key got {status}")
            status, _ = precall.post(None, raw=b"{not json")
            if status != 400:
                counters.add("garbage", False, f"bad JSON got {status}")
        counters.add("garbage", True)
        stop.wait(period)
    for s in slow:
        s.close()


# ------------------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "precall"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, help="overrides --minutes")
    ap.add_argument("--rate", type=float, default=1.0, help="load multiplier (1: about 10 calls/s)")
    ap.add_argument("--t1-ms", type=int, default=500, help="sip.t1_ms (transactions linger 64*T1)")
    ap.add_argument("--ttl-secs", type=int, default=30, help="store.ttl_secs")
    ap.add_argument("--sample-secs", type=float, default=5.0)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    for tool in ["sipp"]:
        if not shutil.which(tool):
            print(f"soak: {tool} is not installed (apt-get install sip-tester)", file=sys.stderr)
            return 2
    workdir = tempfile.mkdtemp(prefix="precall-soak-")
    uas_port = free_port()
    uas = sipp_uas(workdir, uas_port)
    stats_secs = max(1, int(args.sample_secs))
    precall = Precall(args.bin, workdir, uas_port, args.t1_ms, args.ttl_secs, stats_secs)
    t1 = args.t1_ms / 1000.0
    counters = Counters()
    failures = []
    samples = []
    try:
        time.sleep(1)
        base_fds = precall.fds()
        base_rss = precall.rss_kib()
        print(f"soak: {duration:.0f} s of load on precall pid {precall.proc.pid} (fds {base_fds}, "
              f"RSS {base_rss} KiB), work dir {workdir}", flush=True)
        stop = threading.Event()
        r = args.rate
        threads = [
            threading.Thread(target=hits_worker, args=(precall, workdir, 4 * r, stop, counters)),
            threading.Thread(target=uac_worker, args=(precall, t1, "waited", 2 * r, stop, counters,
                                                      numbers_from(1_000_000))),
            threading.Thread(target=uac_worker, args=(precall, t1, "fallback", 2 * r, stop, counters,
                                                      numbers_from(2_000_000))),
            threading.Thread(target=uac_worker, args=(precall, t1, "cancel", 1 * r, stop, counters,
                                                      numbers_from(3_000_000))),
            threading.Thread(target=garbage_worker, args=(precall, 40 * r, stop, counters)),
        ]
        for t in threads:
            t.daemon = True
            t.start()
        start = time.time()
        while time.time() - start < duration:
            time.sleep(args.sample_secs)
            s = precall.last_stats()
            sample = dict(t=round(time.time() - start), rss=precall.rss_kib(), fds=precall.fds(),
                          held=s.get("held"), calls=s.get("calls"), waiting=s.get("waiting"),
                          contexts=s.get("contexts"), tcp=s.get("tcp_inbound"))
            samples.append(sample)
            print("soak:", " ".join(f"{k}={v}" for k, v in sample.items()),
                  "ok=" + json.dumps(counters.ok), "failed=" + json.dumps(counters.failed), flush=True)
            if precall.proc.poll() is not None:
                failures.append("precall exited during the load")
                break
        stop.set()
        for t in threads:
            t.join(120)
        # Drain: transactions linger 64*T1, unused contexts live ttl_secs.
        drain = 64 * t1 + args.ttl_secs + 2 * stats_secs + 5
        print(f"soak: load stopped; waiting up to {drain:.0f} s for the baseline", flush=True)
        deadline = time.time() + drain
        final = {}
        seen = precall.stats_count()
        while time.time() < deadline:
            time.sleep(stats_secs)
            if precall.stats_count() == seen:
                continue
            final = precall.last_stats()
            if all(final.get(k) == 0 for k in ["held", "calls", "waiting", "contexts", "tcp_inbound"]):
                break
        time.sleep(1)
        end_fds, end_rss = precall.fds(), precall.rss_kib()
        print(f"soak: after the load: {final} fds={end_fds} rss={end_rss}", flush=True)
        for k in ["held", "calls", "waiting", "contexts", "tcp_inbound"]:
            if final.get(k) != 0:
                failures.append(f"{k} = {final.get(k)} after the load, want 0")
        if end_fds > base_fds + 2:
            failures.append(f"{end_fds} descriptors open after the load, {base_fds} before")
        warm = [x["rss"] for x in samples[: max(1, len(samples) // 3)]]
        warm_rss = max(warm) if warm else base_rss
        if end_rss > warm_rss * 1.3 + 10 * 1024:
            failures.append(f"RSS {end_rss} KiB after the load, {warm_rss} KiB once warmed up")
        total_ok = sum(counters.ok.get(f, 0) for f in ["hit", "waited", "fallback", "cancel"])
        total_failed = sum(counters.failed.get(f, 0) for f in ["hit", "waited", "fallback", "cancel"])
        if total_ok == 0 or total_failed > max(1, total_ok // 100):
            failures.append(f"{total_failed} failed calls for {total_ok} good ones: {counters.reasons}")
        if final.get("tcp_idle_closed", 0) < counters.slow_connections - 1:
            failures.append(f"only {final.get('tcp_idle_closed')} of {counters.slow_connections} half-message "
                            "TCP connections were closed by the idle timeout")
        if counters.failed.get("garbage"):
            failures.append(f"garbage checks failed: {counters.reasons}")
        if precall.proc.poll() is not None:
            failures.append("precall is not running")
        print("soak: calls ok " + json.dumps(counters.ok) + ", failed " + json.dumps(counters.failed), flush=True)
    finally:
        precall.stop()
        uas.terminate()
        try:
            uas.wait(5)
        except subprocess.TimeoutExpired:
            uas.kill()
    if failures:
        print("soak: FAILED\n  " + "\n  ".join(failures), flush=True)
        print(f"soak: precall log: {precall.log_path}", flush=True)
        return 1
    print("soak: OK", flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
