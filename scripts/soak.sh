#!/usr/bin/env bash
# Soak test: a steady mixed load (SIPp hits via preloaded webhooks, waited calls, fallbacks,
# CANCELs, garbage over UDP/TCP/HTTP) against the release binary, sampling RSS, open file
# descriptors and precall's `stats` line (held calls, transactions, contexts, connections),
# then asserting they all return to baseline. Everything is aimed at 127.0.0.1.
#
#   scripts/soak.sh                 10 minutes
#   scripts/soak.sh --minutes 30    longer
#   scripts/soak.sh --minutes 2 --rate 3    shorter, three times the load
#
# Any other option is passed to scripts/soak.py (see `python3 scripts/soak.py --help`).
# Needs sipp (Debian package sip-tester) and python3. A short version runs in CI as the
# integration test `soak::short_soak_returns_to_baseline`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v sipp >/dev/null 2>&1 || { echo "soak.sh: sipp not found (apt-get install sip-tester)" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "soak.sh: python3 not found" >&2; exit 1; }

cargo build --release --bin precall
exec python3 scripts/soak.py --bin target/release/precall "$@"
