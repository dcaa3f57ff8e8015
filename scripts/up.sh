#!/usr/bin/env bash
# The main job: install what is missing, build, and run `dalp up` (embedded TLS-only
# PostgreSQL with the five schemas and roles, plus the HTTP API). Extra arguments go to
# `dalp up`, e.g. ./scripts/up.sh --data-dir /var/lib/dalp --api-port 8081
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --quiet --bin dalp
exec target/debug/dalp up "$@"
