#!/usr/bin/env bash
# The full test suite: install what is missing, check formatting and lints, run every test
# (each test binary starts its own PostgreSQL; nothing depends on a running server).
set -euo pipefail
cd "$(dirname "$0")/.."
# A clean build of every test binary: the incremental cache would only add disk (1.6 GB for
# the test binaries alone, measured) that a one-off run never reads back. A machine short of
# disk fails in the linker with nothing clear to say why, so say how much there is first.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
echo "disk free for the build and the test clusters: $((free_kib / 1024)) MiB" >&2
if [ "$free_kib" -lt $((6 * 1024 * 1024)) ]; then
  echo "warning: under 6 GiB free; a clean run (installs, build, test clusters) took 4.7 GB here" >&2
fi
DALP_DEPS_TEST=1 bash scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast -- --test-threads 2 2>&1 | tee "$log" || status=$?
# The domain suites once more with every component pool going through PgBouncer
# (transaction mode); LISTEN stays direct.
# (--workspace keeps the feature set of the first run, so nothing is rebuilt.)
DALP_TEST_VIA_POOLER=1 cargo test --workspace --no-fail-fast --test api --test engine \
  --test tx_requests --test ingest --test seal --test forward --test change_control \
  --test pooler -- --test-threads 2 2>&1 | tee -a "$log" || status=$?
# The API's contract: the generated OpenAPI document validated as OpenAPI 3.1, then fuzzed
# with schemathesis against `dalp up --demo` (every check; bounded examples).
cargo build --quiet -p dalp-cli
echo "api contract fuzzing (scripts/fuzz-api.sh)" | tee -a "$log"
# A fixed seed keeps CI reproducible; run scripts/fuzz-api.sh by hand for new seeds.
if DALP_FUZZ_EXAMPLES="${DALP_FUZZ_EXAMPLES:-25}" DALP_FUZZ_SEED="${DALP_FUZZ_SEED:-1}" bash scripts/fuzz-api.sh target/debug/dalp 2>&1 | tee -a "$log"; then
  echo "test result: ok. 1 passed; 0 failed (api contract fuzzing)" | tee -a "$log"
else
  echo "test result: FAILED. 0 passed; 1 failed (api contract fuzzing)" | tee -a "$log"
  status=1
fi
# One closing line over all test binaries (cargo prints one per binary, doc-tests last).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
