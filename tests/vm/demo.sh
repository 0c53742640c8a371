#!/bin/bash
# Demo of broker in the test VM, run as root by `tests/vm/rig.py demo` after
# scripts/install. Two managed users (uids in the default policy's range
# 1000-59999) and one unmanaged system user each serve HTTP on their own
# loopback port while a curl loop requests from each. Every few seconds the
# demo prints `broker status`. It ends after DEMO_SECONDS (default 300) and
# exits 1 if any broker step failed.
set -uo pipefail

DEMO_SECONDS=${DEMO_SECONDS:-300}
STATUS_EVERY=10
# Servers outlive the load by this margin, so the final report still lists them.
SERVER_MARGIN=120
REQUEST_PAUSE=0.2
WEB_ROOT=/srv/broker-demo
# name:uid:port; uids below 1000 are system users, which the policy leaves alone.
USERS=(alice:1001:8001 bob:1002:8002 websvc:901:8003)

failures=0
step() { echo; echo "== $* (uptime $(cut -d' ' -f1 /proc/uptime) s)"; }
fail() { echo "demo: FAILED: $*"; failures=$((failures + 1)); }

create_user() {
    local name=$1 uid=$2
    id "$name" >/dev/null 2>&1 && return
    if [ "$uid" -lt 1000 ]; then
        useradd --system --uid "$uid" --no-create-home --shell /usr/sbin/nologin "$name"
    else
        useradd --uid "$uid" --create-home --shell /bin/bash "$name"
    fi
}

start_server() {
    local name=$1 uid=$2 port=$3
    systemd-run --quiet --unit="demo-web-$name" --uid="$name" \
        --slice="user-$uid.slice" -p RuntimeMaxSec=$((DEMO_SECONDS + SERVER_MARGIN)) \
        python3 -m http.server --bind 127.0.0.1 --directory "$WEB_ROOT" "$port"
}

# The client is bounded by `timeout` and only requests 127.0.0.1.
start_client() {
    local name=$1 port=$3
    systemd-run --quiet --unit="demo-load-$name" \
        timeout "$DEMO_SECONDS" bash -c "while :; do
            curl -s -o /dev/null http://127.0.0.1:$port/ || echo 'curl to port $port failed'
            sleep $REQUEST_PAUSE
        done"
}

wait_for_port() {
    local port=$1
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$port/" && return 0
        sleep 0.2
    done
    return 1
}

show_processes() {
    local entry name pid
    for entry in "${USERS[@]}"; do
        name=${entry%%:*}
        pid=$(systemctl show -p MainPID --value "demo-web-$name")
        echo "$name: pid $pid uid $(stat -c %u "/proc/$pid" 2>/dev/null)" \
            "cgroup $(cut -d: -f3 "/proc/$pid/cgroup" 2>/dev/null)"
    done
}

# http.server logs one line per request to its unit's journal.
show_requests() {
    local entry name served
    for entry in "${USERS[@]}"; do
        name=${entry%%:*}
        served=$(journalctl -q -u "demo-web-$name" -o cat | grep -c '"GET / ')
        echo "$name: $served requests served"
    done
}

stop_units() {
    local entry name
    for entry in "${USERS[@]}"; do
        name=${entry%%:*}
        systemctl stop "demo-load-$name" "demo-web-$name" 2>/dev/null
    done
}

step "start broker"
broker --version || fail "broker --version"
systemctl enable --now broker || fail "systemctl enable --now broker"
systemctl --no-pager status broker | head -n 5

step "users and their web servers"
mkdir -p "$WEB_ROOT"
echo "broker demo" >"$WEB_ROOT/index.html"
trap stop_units EXIT
for entry in "${USERS[@]}"; do
    IFS=: read -r name uid port <<<"$entry"
    create_user "$name" "$uid"
    start_server "$name" "$uid" "$port"
done
for entry in "${USERS[@]}"; do
    IFS=: read -r name uid port <<<"$entry"
    wait_for_port "$port" || { echo "demo: server of $name on port $port not up"; exit 1; }
    start_client "$name" "$uid" "$port"
done
show_processes

step "load for $DEMO_SECONDS s; broker status every $STATUS_EVERY s"
end=$((SECONDS + DEMO_SECONDS))
while [ "$SECONDS" -lt "$end" ]; do
    sleep "$STATUS_EVERY"
    step "broker status"
    broker status || fail "broker status"
done

step "end"
show_processes
show_requests
journalctl -u broker --no-pager -n 20 || true
echo "demo: $failures failed broker steps"
[ "$failures" -eq 0 ]
