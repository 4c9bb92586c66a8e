#!/usr/bin/env python3
"""Print the PID of the process holding UDP PORT on 127.0.0.1 (via /proc; stdlib only).

Used by bench/run-all.sh --perf to attach perf to the proxy that run.sh started.
"""
import os
import sys


def main():
    port = int(sys.argv[1])
    inodes = set()
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except OSError:
            pass
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    print(pid)
                    return 0
        except OSError:
            continue
    return 1


if __name__ == "__main__":
    sys.exit(main())
