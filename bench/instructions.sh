#!/usr/bin/env bash
# Instructions per relayed request in one of our processes, counted by
# callgrind: unlike time on a shared 2-core VM, the count repeats to within
# a fraction of a percent, so it can compare two versions of the code run
# minutes or days apart (docs/performance.md, "Against the small-request goals").
#
#   bench/instructions.sh server [PYTHON] [N]   our server, the Go relay-client
#   bench/instructions.sh client [PYTHON] [N]   our relay-client, our server
#
# PYTHON (default /tmp/bench-venv/bin/python) has the relay installed; N
# (default 200) sequential 1 KiB requests on one kept-alive connection are
# counted, after 50 uncounted ones of warm-up, to the Go bench-backend. Needs
# valgrind, and the Go binaries in ../shared/reference-go (GO_DIR).
set -euo pipefail
WHO=${1:?server or client}
PY=${2:-/tmp/bench-venv/bin/python}
N=${3:-200}
GO=${GO_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/reference-go}
TMP=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"' EXIT
# Out of any checkout: python -c puts the current directory first on sys.path,
# and a checkout's relay/ would be imported instead of PYTHON's.
cd "$TMP"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # FILE TEXT: up to 120 s (valgrind starts slowly)
    for _ in $(seq 1 240); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.5; done
    echo "instructions.sh: no '$2' in $1" >&2; cat "$1" >&2; exit 1
}
twistd=("$PY" -c "from twisted.scripts.twistd import run; run()" --pidfile= -n)
counted=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/cg.out")

BACKEND=$(free_port); RELAY=$(free_port)
"$GO/bench-backend" "$BACKEND" >/dev/null 2>&1 & PIDS+=($!)
server=("${twistd[@]}" relay --port="tcp:$RELAY:interface=127.0.0.1")
client_flags=(--backend_scheme=http --backend_address="127.0.0.1:$BACKEND" --relay_scheme=http
              --relay_address="127.0.0.1:$RELAY" --server_name=bench --disable_auth_for_remote)
case "$WHO" in
    server)
        "${counted[@]}" "${server[@]}" >"$TMP/server.log" 2>&1 & PIDS+=($!); COUNTED=$!
        wait_for "$TMP/server.log" "Relay server listening"
        "$GO/http-relay-client" "${client_flags[@]}" >"$TMP/client.log" 2>&1 & PIDS+=($!) ;;
    client)
        "${server[@]}" >"$TMP/server.log" 2>&1 & PIDS+=($!)
        wait_for "$TMP/server.log" "Relay server listening"
        "${counted[@]}" "${twistd[@]}" relay-client "${client_flags[@]}" >"$TMP/client.log" 2>&1 & PIDS+=($!); COUNTED=$!
        ;;
    *) echo "instructions.sh: server or client, not $WHO" >&2; exit 2 ;;
esac
wait_for "$TMP/server.log" "Relay client connected"

requests() {
    python3 - "$RELAY" "$1" <<'EOF'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for _ in range(n):
    c.request("GET", "/client/bench/bytes/1024")
    r = c.getresponse()
    body = r.read()
    assert r.status == 200 and len(body) == 1024, (r.status, len(body))
EOF
}
requests 50
callgrind_control -i on "$COUNTED" >/dev/null 2>&1
requests "$N"
callgrind_control -i off "$COUNTED" >/dev/null 2>&1
callgrind_control -d "$COUNTED" >/dev/null 2>&1
for _ in $(seq 1 50); do [ -s "$TMP/cg.out.1" ] && break; sleep 0.2; done
total=$(callgrind_annotate "$TMP/cg.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
echo "$WHO ($("$PY" -c 'import platform; print(platform.python_implementation(), platform.python_version())')):" \
     "$((total / N / 1000)) k instructions per relayed request ($N requests)"
