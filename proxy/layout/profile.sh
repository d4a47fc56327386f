#!/usr/bin/env bash
# Regenerates hot-functions.txt: every function of keyproof-proxy that runs
# when a sidecar pair starts, serves keep-alive and new-connection traffic,
# completes full handshakes and answers the admin endpoints, as seen by
# valgrind's callgrind, busiest first. Run it after dependency or profile
# changes (symbol hashes follow crate metadata), then rebuild.
# usage: proxy/layout/profile.sh      needs: valgrind, wrk, nginx, openssl, curl
set -euo pipefail
here=$(dirname "$(realpath "$0")"); repo=$(realpath "$here/../..")
bench=$repo/../shared/bench
bin=$repo/target/x86_64-unknown-linux-gnu/release/keyproof-proxy
work=$(mktemp -d)
cd "$repo" && cargo build-proxy
"$bench/gen-certs.sh" "$work/certs" >/dev/null
"$bench/sidecars.sh" start backend "$work/certs" "$work/run" >/dev/null
trap '"$bench/sidecars.sh" stop backend "$work/certs" "$work/run" >/dev/null 2>&1 || true' EXIT
# Writes the two configs (and starts a pair, which is stopped at once).
KEYPROOF_PROXY=$bin "$bench/sidecars.sh" start keyproof "$work/certs" "$work/run" >/dev/null
"$bench/sidecars.sh" stop keyproof "$work/certs" "$work/run" >/dev/null
for side in in out; do
  valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/cg.$side" \
    "$bin" run --config "$work/run/keyproof-$side.toml" > "$work/$side.log" 2>&1 &
done
for _ in $(seq 120); do
  curl -sf -o /dev/null localhost:15091/ready && curl -sf -o /dev/null localhost:15092/ready && break; sleep 0.5
done
for p in 15091 15092; do curl -s localhost:$p/metrics localhost:$p/identity localhost:$p/live >/dev/null; done
wrk -t1 -c8 -d10s http://127.0.0.1:15001/ >/dev/null
wrk -t1 -c2 -d5s -H "Connection: close" http://127.0.0.1:15001/ >/dev/null
curl -s -o /dev/null -X POST --data-binary @"$work/certs/ca.crt" http://127.0.0.1:15001/upload
openssl s_time -connect 127.0.0.1:15443 -new -cert "$work/certs/client.crt" -key "$work/certs/client.key" \
  -CAfile "$work/certs/ca.crt" -time 3 >/dev/null 2>&1 || true
for p in 15091 15092; do curl -s localhost:$p/metrics >/dev/null; done
pkill -TERM -f "callgrind.*$work/run/keyproof" || true
for _ in $(seq 60); do pgrep -f "callgrind.*$work/run/keyproof" >/dev/null || break; sleep 0.5; done
python3 - "$bin" "$here/hot-functions.txt" "$work/cg.in" "$work/cg.out" <<'PY'
import collections, re, subprocess, sys
binary, out, *profiles = sys.argv[1:]
cost = collections.Counter()
for path in profiles:
    names, cur, skip = {}, None, False
    for line in open(path, errors="replace"):
        m = re.match(r"(c?)fn=\((\d+)\)(?: (.*))?", line)
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3).strip()
            if not m.group(1):
                cur, skip = names.get(m.group(2)), False
            continue
        if line.startswith("calls="):
            skip = True  # the next cost line is the callee's, not ours
            continue
        if cur and line[:1] in "0123456789+-*":
            if skip:
                skip = False
                continue
            parts = line.split()
            cost[cur] += int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 1
nm = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True)
text = {l.split()[2] for l in nm.stdout.splitlines() if len(l.split()) == 3 and l.split()[1] in "tTwW"}
hot = [name for name, _ in cost.most_common() if name in text]
open(out, "w").write("".join(n + "\n" for n in hot))
print(f"{len(hot)} functions written to {out}")
PY
echo "now rebuild: cargo build-proxy"
