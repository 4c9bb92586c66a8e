#!/usr/bin/env bash
# Hold-release lag: how long after the webhook's answer the agent sees a held INVITE.
#
#   memory, one node               the call held and the webhook posted on one precall
#   redis, held on B, webhook on A two precalls sharing a redis-server of the test's own
#
# Prints p50/p99 (µs) of "webhook answered → INVITE at the agent" (negative: the INVITE
# was out before the HTTP answer reached the client) and of "webhook sent → INVITE".
# PRECALL_LAG_CALLS sets the number of calls per setup (default 1000). Release build, so
# the numbers mean something; needs redis-server (apt-get install redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }
PRECALL_LAG_CALLS="${PRECALL_LAG_CALLS:-1000}" \
  cargo test --release --test it redis::hold_release_lag -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -oE '(memory|redis), .*|test result.*'
