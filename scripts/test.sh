#!/usr/bin/env bash
# Every check and test of precall, as CI runs them (.ci/run calls this script):
#   formatting, clippy with warnings as errors, unit tests, and the end-to-end tests in
#   tests/it, which start the real binary and drive it with raw SIP sockets and SIPp.
#
# On a fresh Debian/Ubuntu machine it first installs what the tests need when missing:
#   sipp          (package sip-tester)  the SIP traffic generator used as caller and agent
#   redis-server  (package redis-server) for the Redis store backend tests
#   chromium      (package chromium)     drives the status page /ui/ headless
# Root installs directly; anyone else goes through sudo.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

missing=()
command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: missing ${missing[*]} and no apt-get to install them; install them by hand" >&2
        exit 1
    fi
    echo "scripts/test.sh: installing ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "scripts/test.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
