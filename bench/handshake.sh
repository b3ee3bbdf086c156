#!/usr/bin/env bash
# Full mTLS handshakes per second per core (issue 3, point 8b): Warden's endpoints (criterion
# bench `handshake` of warden-identity) against `openssl s_time -new` talking to
# `openssl s_server`, with the same P-256 certificates, on the same core, in one run.
#
# Per core means both ends share one CPU: the Warden bench runs client and server on one
# thread, and the two OpenSSL processes are pinned together with taskset (where available),
# so each rate pays for both sides of every handshake. OpenSSL's rate is completed
# connections over wall-clock time. Usage: bench/handshake.sh [seconds-for-openssl]
# Environment: CORE (default 0), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-10}
core=${CORE:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
command -v openssl >/dev/null || { echo "openssl is not installed (apt-get install openssl)" >&2; exit 2; }
pin=()
if command -v taskset >/dev/null; then pin=(taskset -c "$core"); else echo "taskset not found: not pinned" >&2; fi

work=$(mktemp -d)
server_pid=
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

echo "== building the Warden bench"
cargo bench -p warden-identity --bench handshake --no-run 2>&1 | tee "$work/build.log" >&2
bin=$(sed -n 's/.*Executable benches\/handshake\.rs (\(.*\))$/\1/p' "$work/build.log" | tail -1)
[ -x "$bin" ] || { echo "bench binary not found" >&2; exit 1; }

echo "== Warden: ${pin[*]:-unpinned} $bin --bench mtls_handshake"
WARDEN_BENCH_CERT_DIR="$work" CRITERION_HOME="$work/criterion" "${pin[@]}" "$bin" --bench mtls_handshake
# Criterion's headline figure: the slope estimate (time per iteration), the mean if absent.
rate() { python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); print("%.0f" % (1e9 / (e.get("slope") or e["mean"])["point_estimate"]))' "$1"; }
warden_mem=$(rate "$work/criterion/mtls_handshake/in_memory/new/estimates.json")
warden_tcp=$(rate "$work/criterion/mtls_handshake/loopback_tcp/new/estimates.json")

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# No session tickets: Warden's server sends none either, and s_time -new never resumes.
server_cmd=(openssl s_server -accept "127.0.0.1:$port" -cert "$work/server.pem" -key "$work/server.key"
            -CAfile "$work/root.pem" -Verify 1 -verify_return_error -num_tickets 0 -quiet)
client_cmd=(openssl s_time -connect "127.0.0.1:$port" -new -time "$secs"
            -cert "$work/client.pem" -key "$work/client.key" -CAfile "$work/root.pem")
echo "== OpenSSL ($(openssl version)): ${pin[*]:-} ${server_cmd[*]}"
"${pin[@]}" "${server_cmd[@]}" >"$work/s_server.log" 2>&1 &
server_pid=$!
# s_server -quiet prints nothing when ready: wait (bounded) until the port accepts.
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/s_server.log" >&2; exit 1; }
  sleep 0.1
done
echo "== OpenSSL: ${pin[*]:-} ${client_cmd[*]}"
start=$(date +%s.%N)
"${pin[@]}" "${client_cmd[@]}" >"$work/s_time.log" 2>&1
end=$(date +%s.%N)
grep -E "connections" "$work/s_time.log" || true
conns=$(sed -n 's/^\([0-9]*\) connections in [0-9.]*s;.*/\1/p' "$work/s_time.log" | head -1)
[ -n "$conns" ] || { cat "$work/s_time.log" "$work/s_server.log" >&2; exit 1; }
openssl_rate=$(python3 -c "print('%.0f' % ($conns / ($end - $start)))")

echo
echo "full mTLS handshakes/s on one core (P-256, TLS 1.3, both sides verify):"
printf '  warden  loopback TCP : %8s/s\n' "$warden_tcp"
printf '  warden  in memory    : %8s/s\n' "$warden_mem"
printf '  openssl s_time/s_server: %6s/s  (%s connections in %.1f s)\n' "$openssl_rate" "$conns" "$(python3 -c "print($end - $start)")"
if [ "$warden_tcp" -ge "$openssl_rate" ]; then
  echo "bar met: Warden (loopback TCP) >= OpenSSL"
else
  echo "bar NOT met: Warden (loopback TCP) < OpenSSL"
fi
