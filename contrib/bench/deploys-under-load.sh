#!/usr/bin/env bash
# Requests lost across deploys, measured from outside with wrk(1)
# (apt-get install wrk). Not a test: it times nothing and asserts nothing;
# read wrk's "Socket errors" and "Non-2xx" lines (absent = none).
#
#   contrib/bench/deploys-under-load.sh [DEPLOYS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
deploys=${1:-30}
seconds=${2:-16}
cargo build --release --bins --examples -q
bin=target/release/containerflip
export CONTAINERFLIP_CONTROL=${TMPDIR:-/tmp}/containerflip-bench.$$.sock
port=${PORT:-18090}
for mode in keep-alive close; do
    "$bin" run -q --listen 127.0.0.1:$port --drain-timeout 5s -- target/release/examples/worker &
    sup=$!
    until "$bin" status --check >/dev/null 2>&1; do sleep 0.1; done
    (for _ in $(seq "$deploys"); do "$bin" deploy >/dev/null; sleep "$(echo "scale=2; $seconds / ($deploys + 2)" | bc)"; done) &
    deployer=$!
    header=()
    [ "$mode" = close ] && header=(-H "Connection: close")
    echo "== $mode, $deploys deploys"
    wrk -t2 -c32 -d"${seconds}s" "${header[@]}" "http://127.0.0.1:$port/" | grep -E "requests in|Socket errors|Non-2xx|Requests/sec"
    wait "$deployer"
    echo "supervisor RSS: $(grep VmRSS /proc/$sup/status | tr -s ' ')"
    "$bin" status --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("counters:", d["counters"])'
    "$bin" stop
done
