#!/usr/bin/env bash
# Contract fuzzing of the HTTP API with schemathesis (pinned in scripts/test-requirements.txt,
# installed by deps.sh with DALP_DEPS_TEST=1): starts `dalp up --demo` in a scratch
# directory, takes a full administrator session (password, then TOTP enrolment), and runs
# every schemathesis check against GET /api/v1/openapi.json. Fails on any server error or
# any response that does not match the document. Stops the instance by pid, also on failure.
#
# usage: scripts/fuzz-api.sh [DALP_BINARY]    (default target/debug/dalp)
#   DALP_FUZZ_EXAMPLES   test cases per operation and phase (default 25)
#   DALP_FUZZ_SEED       a seed to replay a run (default: random, printed)
#   DALP_FUZZ_PORT       API port (default 18080)
#   DALP_FUZZ_LOG        the full report (default target/fuzz-api.log)
set -euo pipefail
cd "$(dirname "$0")/.."
dalp="${1:-target/debug/dalp}"
venv="${DALP_TEST_VENV:-/opt/dalp/testvenv}"
examples="${DALP_FUZZ_EXAMPLES:-25}"
seed="${DALP_FUZZ_SEED:-$RANDOM}"
port="${DALP_FUZZ_PORT:-18080}"
[ -x "$venv/bin/st" ] || { echo "error: schemathesis is not installed in $venv: run DALP_DEPS_TEST=1 bash scripts/deps.sh" >&2; exit 1; }

work=$(mktemp -d /tmp/dalp-fuzz.XXXXXX)
chmod 755 "$work"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

"$dalp" up --data-dir "$work/data" --api-port "$port" --demo --no-archive >"$work/up.log" 2>&1 &
pid=$!
for _ in $(seq 180); do
  grep -q "dalp ready" "$work/up.log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/up.log" >&2; echo "error: dalp up exited" >&2; exit 1; }
  sleep 1
done
grep -q "dalp ready" "$work/up.log" || { cat "$work/up.log" >&2; echo "error: dalp up not ready in 180 s" >&2; exit 1; }
base="http://127.0.0.1:$port"
password=$(sed -n 's/.*admin admin@demo.dalp.example password \([^ ]*\) .*/\1/p' "$work/up.log")
DALP_FUZZ_TOKEN=$(python3 scripts/api-session.py "$base" admin@demo.dalp.example "$password")
export DALP_FUZZ_TOKEN

"$dalp" openapi >"$work/openapi.json"
"$venv/bin/openapi-spec-validator" "$work/openapi.json"
echo "schemathesis: $examples examples per operation, seed $seed" >&2
# One worker: with two, hypothesis's lambda-source introspection raced once (an internal
# "AST constructor recursion depth mismatch", not a finding).
# Excluded: the two operations that end the fuzzer's own session (logout, and revoking a
# session listed by GET /auth/sessions, which the stateful phase links to). Their contract
# is covered by the API test suite.
"$venv/bin/st" --config-file tests/fuzz/schemathesis.toml run "$base/api/v1/openapi.json" \
  --checks all --max-examples "$examples" --seed "$seed" --workers 1 --no-shrink \
  --exclude-path /api/v1/auth/logout \
  --exclude-path-regex '^/api/v1/auth/sessions/' \
  2>&1 | tee "${DALP_FUZZ_LOG:-target/fuzz-api.log}" | tail -n 80
status=${PIPESTATUS[0]}
if grep -q 'ERROR' "$work/up.log"; then
  echo "server errors logged:" >&2
  grep 'ERROR' "$work/up.log" | tail -n 20 >&2
  status=1
fi
exit "$status"
