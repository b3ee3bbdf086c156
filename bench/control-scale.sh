#!/usr/bin/env bash
# The control plane's scale benchmark (issue 5, point 5): a real `warden control` process
# serving 1,000 namespaces (10,000 AuthorizationPolicies) to 1,000 light proxies of the real
# protocol, each on its own mutual-TLS connection; then policy changes by file rename,
# measured to each concerned proxy's receipt. See crates/control/examples/control_load.rs.
#
# Usage: bench/control-scale.sh [extra control_load options, e.g. --local-changes 100]
# Environment: CARGO_TARGET_DIR; RESULTS (JSON output, default: none).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

# One file descriptor per connection on both sides, plus the config files being read.
want=65536
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want" ]; then
  ulimit -n "$want" 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
fi
echo "== open files limit: $(ulimit -n)" >&2

echo "== building warden and the load generator (release)" >&2
# One invocation: building them apart would compile the shared dependencies twice (the
# example's dev-dependencies change their features).
cargo build --release -p warden --bin warden -p warden-control --example control_load >&2

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -sr)" >&2
json=()
[ -n "${RESULTS:-}" ] && json=(--json "$RESULTS")
exec "$CARGO_TARGET_DIR/release/examples/control_load" \
  --warden "$CARGO_TARGET_DIR/release/warden" "${json[@]}" "$@"
