#!/usr/bin/env bash
# User-space instructions per request of one sidecar of the pair, counted by
# valgrind's callgrind: repeatable whatever else the machine is doing, so
# small changes to the request path show where wall-clock CPU figures are
# lost in noise. Caveats: the kernel's share is not counted; valgrind's CPU
# has no AVX-512, so libc picks other memcpy/memset variants, and it counts
# a `rep movsb` or `rep stosb` as one instruction per byte.
# usage: benches/instructions.sh in|out [BINARY]   (default: the `cargo build-proxy` binary)
#        env: CONNS (8), SECONDS_EACH (8), MEMORY_LIMIT (e.g. 64Mi: the measured side's
#        [runtime] memory_limit; by default none, as outside a container). Needs
#        valgrind, wrk, nginx, openssl.
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/..")
bench=$repo/../shared/bench
side=${1:?in or out}
bin=${2:-$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy}
conns=${CONNS:-8} secs=${SECONDS_EACH:-8}
work=$(mktemp -d)
trap '[ -n "${vg:-}" ] && kill "$vg" 2>/dev/null
      "$bench/sidecars.sh" stop keyproof "$work/certs" "$work/run" >/dev/null 2>&1 || true
      "$bench/sidecars.sh" stop backend "$work/certs" "$work/run" >/dev/null 2>&1 || true' EXIT
"$bench/gen-certs.sh" "$work/certs" >/dev/null
"$bench/sidecars.sh" start backend "$work/certs" "$work/run" >/dev/null
KEYPROOF_PROXY=$bin "$bench/sidecars.sh" start keyproof "$work/certs" "$work/run" >/dev/null
# The measured side is restarted under valgrind, instrumenting nothing until
# the pair is warm.
kill "$(cat "$work/run/keyproof-$side.pid")"; sleep 0.5
if [ -n "${MEMORY_LIMIT:-}" ]; then
  sed -i "s/^worker_threads = 1$/worker_threads = 1\nmemory_limit = \"$MEMORY_LIMIT\"/" \
    "$work/run/keyproof-$side.toml"
  grep -q "^memory_limit = \"$MEMORY_LIMIT\"" "$work/run/keyproof-$side.toml"
fi
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" \
  "$bin" run --config "$work/run/keyproof-$side.toml" > "$work/valgrind.log" 2>&1 &
vg=$!
port=$([ "$side" = in ] && echo 15443 || echo 15001)
for _ in $(seq 200); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.3; done
wrk -t1 -c"$conns" -d3s http://127.0.0.1:15001/ >/dev/null
callgrind_control -i on "$vg" >/dev/null 2>&1
out=$(wrk -t1 -c"$conns" -d"${secs}s" http://127.0.0.1:15001/)
callgrind_control -i off "$vg" >/dev/null 2>&1
callgrind_control -d "$vg" >/dev/null 2>&1
sleep 1
reqs=$(awk '/requests in/{print $1}' <<<"$out")
ir=$(cat "$work"/cg.out.* | awk '/^totals:/{s+=$2} END{print s}')
echo "$(basename "$bin") $side: $reqs requests, $ir instructions, $((ir / reqs)) per request"
echo "profile: callgrind_annotate $(ls "$work"/cg.out.* | tail -1)"
