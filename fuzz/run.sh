#!/usr/bin/env bash
# Runs every fuzz target (`cargo fuzz list`) for SECONDS each (default 20),
# starting from the committed corpus in fuzz/corpus/<target>/. Exits non-zero
# if any target crashes, fails an invariant or hangs; the input that did is
# printed (hex) and left in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh [SECONDS]
#
# Stable toolchain: `-s none` (AddressSanitizer needs nightly; the code under
# test is safe Rust, where bounds and overflow checks, on in fuzz builds,
# catch what ASan would). New inputs the run finds go to a temporary
# directory, so the committed corpus stays as it is; `cargo fuzz cmin` and a
# commit are how it grows.
#
# KEYPROOF_FUZZ_TARGET_DIR: where to build (default fuzz/target); CI points it
# at a directory that outlives the checkout so that later runs rebuild only
# what changed.
set -euo pipefail
cd "$(dirname "$0")"

secs=${1:-20}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz/run.sh: cargo-fuzz is missing (cargo install cargo-fuzz --locked)" >&2
  exit 2
fi
target_dir=${KEYPROOF_FUZZ_TARGET_DIR:-$PWD/target}
# 16 codegen units: a build several times faster than cargo-fuzz's default
# of one, for fuzzing a little slower; right for short runs.
opts=(-s none --target-dir "$target_dir" --codegen-units 16)

start=$(date +%s)
cargo fuzz build "${opts[@]}"
echo "fuzz/run.sh: built in $(( $(date +%s) - start )) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in $(cargo fuzz list); do
  mkdir -p "$work/$t" "corpus/$t"
  echo "fuzz/run.sh: $t for ${secs} s"
  # -timeout: one input running 10 s is a hang, reported like a crash;
  # the outer timeout is a last resort should libFuzzer itself stall.
  if ! timeout --kill-after=10 $((secs + 120)) \
      cargo fuzz run "${opts[@]}" "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$work/$t.log" 2>&1; then
    failed+=("$t")
    echo "fuzz/run.sh: $t FAILED; its log:" >&2
    grep -v '^#[0-9]' "$work/$t.log" | tail -60 >&2
    for a in artifacts/"$t"/*; do
      [ -f "$a" ] || continue
      echo "fuzz/run.sh: $a:" >&2
      head -c 2048 "$a" | od -A d -c | head -40 >&2
    done
  else
    grep -E '^stat::number_of_executed_units|^Done' "$work/$t.log" | tail -1
  fi
done
echo "fuzz/run.sh: $(( $(date +%s) - start )) s in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz/run.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz/run.sh: every target ran clean"
