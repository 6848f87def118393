#!/usr/bin/env bash
# Fuzz the boundary with cargo-fuzz (libFuzzer, nightly toolchain).
#   scripts/fuzz.sh              every target for FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh api_input    one target
# Targets and their oracles:
#   normalize_match  normalisation idempotent; no //, /./, /../; a path that
#                    normalises under /admin always matches /admin/**
#   config_load      the config loader never panics; every error is located
#   token_parse      no Authorization/Cookie value panics or is accepted unsigned
#   api_input        the challenge API/page over TCP answers < 500 to any body
# A crash is saved under fuzz/artifacts/<target>/ and makes this script fail
# (so does a target that no longer builds: the fuzz crate is outside the
# workspace; CI checks that it compiles, `.ci/run`);
# turn it into a row of `regressions()` in tests/properties.rs (CI runs those
# oracles as proptest properties on stable).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/tmp/stepgate-fuzz-target}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(normalize_match config_load token_parse api_input)
status=0
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${secs}s"
  mkdir -p "fuzz/corpus/$t"
  # A target that does not build is not a crash: say which it is.
  if ! cargo +nightly fuzz build "$t" 2>&1 | tail -n 25; then
    echo "!! $t does not build"
    status=1
    continue
  fi
  if ! cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -max_len=4096 -rss_limit_mb=2048 2>&1 | tail -n 25; then
    echo "!! $t found a crash: see fuzz/artifacts/$t/"
    status=1
  fi
done
exit $status
