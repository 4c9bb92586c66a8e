#!/usr/bin/env python3
"""The tables of a bench/run-all.sh session (python3 standard library only).

  report.py SESSION_DIR [--elapsed S] [--quick 0|1]
      Reads SESSION_DIR/results.jsonl; prints Markdown (ratios against Kamailio, the
      issue's targets, the raw figures); writes report.md and report.json beside it.
  report.py --line JSON
      One short progress line for a run.sh result.

Ratios are taken within a round (the k-th precall run against the k-th Kamailio run,
measured back to back), then the median over rounds is shown: the machine is shared
and noisy, so only figures from the same session and round are compared.
"""
import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

SIPP_RUNS = ["direct", "kamailio", "precall-hit", "precall-fallback", "precall-held"]
STATUS_RE = re.compile(r'\bstatus="?(hit|waited|fallback|cancelled)"?')
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.2f}"


def fx(v):
    return "–" if v is None else f"{v:.2f}×"


def status_mix(bench_out, run_dir):
    """Per-call outcome counts from precall's log (one info line per call)."""
    if not run_dir:
        return None
    base = os.path.join(bench_out, run_dir, "proxy.log")
    path = base if os.path.exists(base) else base + ".gz"
    if not os.path.exists(path):
        return None
    opener = gzip.open if path.endswith(".gz") else open
    counts = {}
    with opener(path, "rt", errors="replace") as f:
        for line in f:
            if "precall::sip::proxy" not in line or " call " not in line:
                continue
            m = STATUS_RE.search(ANSI_RE.sub("", line))
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts or None


def follow_summary(bench_out, run_dir):
    path = os.path.join(bench_out, run_dir or "", "follow.log")
    try:
        with open(path) as f:
            lines = [json.loads(x) for x in f if x.startswith("{")]
        return lines[-1] if lines else None
    except (OSError, ValueError):
        return None


def machine():
    info = {"nproc": os.cpu_count(), "kernel": os.uname().release}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/etc/debian_version") as f:
            info["debian"] = f.read().strip()
    except OSError:
        pass
    for tool, args in (("sipp", ["-v"]), ("kamailio", ["-v"]), ("wrk", ["-v"])):
        if shutil.which(tool):
            try:
                out = subprocess.run([tool, *args], capture_output=True, text=True, timeout=5)
                text = (out.stdout + out.stderr).strip().splitlines()
                line = next((x for x in text if x.strip()), "")
                info[tool] = line.strip()[:60]
            except (OSError, subprocess.SubprocessError):
                pass
    info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


def build(session, elapsed, quick):
    bench_out = os.path.abspath(os.path.join(session, "..", ".."))
    rows = []
    with open(os.path.join(session, "results.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass

    # SIPp runs, numbered into rounds by occurrence
    runs = {name: [] for name in SIPP_RUNS}
    for r in rows:
        if r.get("name") in runs and "setup_ms_p50" in r:
            runs[r["name"]].append(r)
    for name in ("precall-hit", "precall-fallback", "precall-held"):
        for r in runs[name]:
            r["status_mix"] = status_mix(bench_out, r.get("run_dir"))
            if name == "precall-held":
                r["follower"] = follow_summary(bench_out, r.get("run_dir"))
    kam = runs["kamailio"]

    table = []
    for name in SIPP_RUNS:
        rs = runs[name]
        if not rs:
            continue
        row = {"name": name, "rounds": len(rs), "rate": rs[0].get("rate"),
               "calls_per_run": rs[0].get("calls"),
               "ok": sum(r.get("ok") or 0 for r in rs),
               "calls": sum(r.get("calls") or 0 for r in rs),
               "failed": sum(r.get("failed") or 0 for r in rs),
               "retransmissions": sum(r.get("retransmissions") or 0 for r in rs)}
        for key in ("cpu_us_per_call", "setup_ms_p50", "setup_ms_p99",
                    "proxy_rss_kb_peak", "proxy_pss_kb_peak"):
            row[key] = median([r.get(key) for r in rs])
            row[key + "_x"] = median([ratio(r.get(key), k.get(key))
                                      for r, k in zip(rs, kam)])
            row[key + "_all"] = [r.get(key) for r in rs]
        mix = {}
        for r in rs:
            for k, v in (r.get("status_mix") or {}).items():
                mix[k] = mix.get(k, 0) + v
        row["status_mix"] = mix or None
        if name == "precall-held":
            row["follower"] = [r.get("follower") for r in rs]
        table.append(row)

    def one(kind, name=None):
        found = [r for r in rows if r.get("kind") == kind and (name is None or r.get("name") == name)]
        return found[-1] if found else None

    lag_low = one("release_lag", "release-lag-low")
    lag_high = one("release_lag", "release-lag-high")
    ingest = next((r for r in reversed(rows) if r.get("name") == "webhook-ingest"), None)
    held = one("memory", "memory-held")
    ctxs = one("memory", "memory-contexts")
    max_kam = one("max_cps", "kamailio")
    max_pc = one("max_cps", "precall-hit")
    bg = [r for r in rows if r.get("name") == "precall-hit-bg"]

    hit = next((t for t in table if t["name"] == "precall-hit"), None)
    targets = []

    def target(what, measured, goal, ok):
        targets.append({"target": what, "measured": measured, "goal": goal,
                        "met": None if ok is None else bool(ok)})

    if hit:
        x = hit["cpu_us_per_call_x"]
        target("CPU per proxied call (hit) vs Kamailio", fx(x), "≤ 0.80×", None if x is None else x <= 0.8)
        x = hit["setup_ms_p99_x"]
        target("setup p99 (hit) vs Kamailio", fx(x), "≤ 1.20×", None if x is None else x <= 1.2)
    if max_kam and max_pc:
        target("max CPS (hit) vs Kamailio", f"{max_pc['max_cps']} vs {max_kam['max_cps']}",
               "≥ Kamailio", max_pc["max_cps"] >= max_kam["max_cps"])
    for lag in (lag_low, lag_high):
        if lag and lag.get("lag_ms"):
            p99 = lag["lag_ms"]["p99"]
            target(f"release lag p99, {lag['name'].rsplit('-', 1)[-1]} load (202 → INVITE at agent)",
                   f"{p99:.3f} ms", "< 1 ms", p99 < 1.0)
    if ingest:
        target("webhook ingest, 32 connections", f"{ingest['req_per_s']:.0f} req/s",
               "≥ 20000 req/s", ingest["req_per_s"] >= 20000)
    if held:
        mb = held["rss_kb_held"] / 1024
        target(f"RSS with {held['held']} calls held", f"{mb:.0f} MiB", "< 1024 MiB", mb < 1024)
    if ctxs:
        mb = ctxs["rss_kb_after"] / 1024
        target(f"RSS with {ctxs['contexts']} cached contexts", f"{mb:.0f} MiB", "< 1024 MiB", mb < 1024)

    return {"session": session, "elapsed_s": elapsed, "quick": bool(quick),
            "machine": machine(), "sipp_runs": table, "targets": targets,
            "release_lag": [x for x in (lag_low, lag_high) if x], "webhook_ingest": ingest,
            "memory": [x for x in (held, ctxs) if x], "max_cps": [x for x in (max_kam, max_pc) if x],
            "background_load": bg}


def markdown(rep):
    out = []
    m = rep["machine"]
    out.append(f"Machine: {m.get('nproc')} vCPU {m.get('cpu', '?')}, {m.get('mem_gib', '?')} GiB, "
               f"kernel {m.get('kernel')}, Debian {m.get('debian', '?')}; {m.get('sipp', 'sipp ?')}; "
               f"{m.get('kamailio', 'kamailio ?')}; load average at the end {m.get('loadavg')}.")
    if rep["sipp_runs"]:
        t0 = rep["sipp_runs"][0]
        out.append("")
        out.append(f"Load: SIPp UAC → proxy → SIPp UAS over UDP on 127.0.0.1, {t0['rate']} cps, "
                   f"{t0['calls_per_run']} calls per run, {t0['rounds']} round(s) alternating "
                   f"Kamailio and precall; Kamailio 2 UDP workers, precall one process.")
    out.append("")
    out.append("| run | ok / calls | CPU µs/call | ×Kam | setup p50 ms | ×Kam | setup p99 ms | ×Kam "
               "| RSS peak MiB | ×Kam | PSS peak MiB | outcome |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in rep["sipp_runs"]:
        mix = t.get("status_mix")
        mix_s = ", ".join(f"{k} {v}" for k, v in sorted(mix.items())) if mix else ""
        kb = lambda v: None if v is None else v / 1024  # noqa: E731
        is_kam = t["name"] == "kamailio"
        out.append(
            f"| {t['name']} | {t['ok']} / {t['calls']} | {fmt(t['cpu_us_per_call'])} | "
            f"{'1' if is_kam else fx(t['cpu_us_per_call_x'])} | {fmt(t['setup_ms_p50'])} | "
            f"{'1' if is_kam else fx(t['setup_ms_p50_x'])} | {fmt(t['setup_ms_p99'])} | "
            f"{'1' if is_kam else fx(t['setup_ms_p99_x'])} | {fmt(kb(t['proxy_rss_kb_peak']))} | "
            f"{'1' if is_kam else fx(t['proxy_rss_kb_peak_x'])} | {fmt(kb(t['proxy_pss_kb_peak']))} | {mix_s} |")
    if rep["sipp_runs"]:
        out.append("")
        out.append("Medians over rounds; each ×Kam is the median of per-round ratios against the "
                   "Kamailio run of the same round. Fallback (20 ms wait) and held (webhook posted "
                   "10 ms after the INVITE) set up slower by design; their CPU is the figure to compare.")
    out.append("")
    out.append("| target (issue 6) | measured | goal | met |")
    out.append("|---|---|---|---|")
    for t in rep["targets"]:
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        out.append(f"| {t['target']} | {t['measured']} | {t['goal']} | {met} |")
    out.append("")
    if rep["release_lag"]:
        out.append("| release lag | measured calls | outcome | 202 → INVITE p50 / p99 / max ms "
                   "| POST sent → INVITE p50 / p99 ms | POST → 202 p50 / p99 ms |")
        out.append("|---|---|---|---|---|---|")
        for r in rep["release_lag"]:
            lag, tot, rtt = r.get("lag_ms") or {}, r.get("post_to_invite_ms") or {}, r.get("post_to_202_ms") or {}
            outcome = ", ".join(f"{k} {v}" for k, v in sorted((r.get("statuses") or {}).items()))
            out.append(f"| {r['name']} | {r['measured']} | {outcome} | "
                       f"{fmt(lag.get('p50'))} / {fmt(lag.get('p99'))} / {fmt(lag.get('max'))} | "
                       f"{fmt(tot.get('p50'))} / {fmt(tot.get('p99'))} | {fmt(rtt.get('p50'))} / {fmt(rtt.get('p99'))} |")
        out.append("")
    w = rep.get("webhook_ingest")
    if w:
        out.append(f"Webhook ingest (wrk, {w['threads']} threads, {w.get('concurrency', 32)} connections, "
                   f"{w['seconds']:.0f} s, a distinct number per request): **{w['req_per_s']:.0f} req/s**, "
                   f"latency p50 {w['latency_ms_p50']:.2f} ms, p99 {w['latency_ms_p99']:.2f} ms, "
                   f"max {w['latency_ms_max']:.1f} ms; {w.get('cpu_us_per_request', '?')} µs of precall CPU "
                   f"per request; errors {w['errors_4xx_5xx'] + w['socket_errors'] + w['timeouts']}.")
        out.append("")
    for r in rep["memory"]:
        if r["name"] == "memory-held":
            out.append(f"Memory, {r['held']} calls held at once: RSS {r['rss_kb_before'] / 1024:.0f} → "
                       f"**{r['rss_kb_held'] / 1024:.0f} MiB** ({r['bytes_per_held_call']} bytes per held call); "
                       f"after CANCELling them all {r.get('rss_kb_after_cancel', 0) / 1024:.0f} MiB.")
        else:
            out.append(f"Memory, {r['contexts']} cached contexts (~200 bytes of JSON each): RSS "
                       f"{r['rss_kb_before'] / 1024:.0f} → **{r['rss_kb_after'] / 1024:.0f} MiB** "
                       f"({r['bytes_per_context']} bytes per context).")
    if rep["memory"]:
        out.append("")
    for r in rep["max_cps"]:
        steps = " · ".join(f"{s['rate']}: {fmt(s['setup_ms_p50'])}/{fmt(s['setup_ms_p99'])} ms, "
                           f"{fmt(s.get('cpu_us_per_call'))} µs"
                           + ("" if s["verdict"] == "PASS" else " FAIL") for s in r["steps"])
        out.append(f"Max CPS {r['name']}: **{r['max_cps']}** ({steps}; stop: {r['stop_reason']})")
    if rep["max_cps"]:
        out.append("")
    for r in rep["background_load"]:
        out.append(f"Background load during the high-load lag phase: {r['name']} {r['ok']}/{r['calls']} "
                   f"at {r['rate']} cps, setup p99 {fmt(r['setup_ms_p99'])} ms, {fmt(r.get('cpu_us_per_call'))} µs/call.")
    if rep["elapsed_s"]:
        out.append("")
        out.append(f"Session {os.path.basename(rep['session'])}, {rep['elapsed_s']} s"
                   + (" (--quick: smoke-test counts, figures not meaningful)" if rep["quick"] else "") + ".")
    return "\n".join(out) + "\n"


def problems(rep):
    """What makes a session not a working run (used by --check; the numbers are not judged)."""
    out = []
    for t in rep["sipp_runs"]:
        if t["calls"] and t["ok"] < 0.9 * t["calls"]:
            out.append(f"{t['name']}: only {t['ok']} of {t['calls']} calls completed")
        mix = t.get("status_mix") or {}
        expected = {"precall-hit": "hit", "precall-fallback": "fallback", "precall-held": "waited"}
        want = expected.get(t["name"])
        if want and mix.get(want, 0) < 0.9 * t["ok"]:
            out.append(f"{t['name']}: outcomes {mix}, expected mostly {want}")
    for r in rep["release_lag"]:
        if not r.get("measured") or r.get("errors"):
            out.append(f"{r['name']}: measured {r.get('measured')}, errors {r.get('errors')}")
    w = rep.get("webhook_ingest")
    if w and (not w["requests"] or w["errors_4xx_5xx"] or w["not_202"]):
        out.append(f"webhook-ingest: {w['requests']} requests, {w['errors_4xx_5xx']} errors")
    for r in rep["memory"]:
        if r["name"] == "memory-held" and r["held"] != r["calls"]:
            out.append(f"memory-held: {r['held']} of {r['calls']} calls held")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("session", nargs="?")
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--quick", type=int, default=0)
    ap.add_argument("--line", help="print one progress line for a run.sh result")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a part did not work (calls failing, wrong outcomes)")
    a = ap.parse_args()
    if a.line:
        r = json.loads(a.line)
        print(f"{r['name']}: ok {r['ok']}/{r['calls']}, setup p50 {r['setup_ms_p50']} ms, "
              f"p99 {r['setup_ms_p99']} ms, cpu {r.get('cpu_us_per_call')} µs/call, "
              f"rss {r.get('proxy_rss_kb_peak')} kB")
        return 0
    if not a.session:
        ap.error("need SESSION_DIR")
    rep = build(a.session, a.elapsed, a.quick)
    md = markdown(rep)
    with open(os.path.join(a.session, "report.json"), "w") as f:
        json.dump(rep, f, indent=1)
    with open(os.path.join(a.session, "report.md"), "w") as f:
        f.write(md)
    sys.stdout.write(md)
    if a.check:
        found = problems(rep)
        for p in found:
            print(f"CHECK FAILED: {p}", file=sys.stderr)
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
