#!/usr/bin/env bash
# Installs the Debian packages dalp needs when they are missing. Sourced by up.sh and test.sh.
#   PostgreSQL 15 server + client, pgAudit (preloaded by the embedded cluster when present),
#   etcd (the HA cluster's DCS), PgBouncer (pooling), pgBackRest (backups).
#   Patroni pinned from PyPI into a virtualenv at /opt/dalp/venv (DALP_VENV), not Debian's 3.0.2.
#   Test tools only with DALP_DEPS_TEST=1 (set by test.sh; DALP_DEPS_ANVIL=1 is the old name):
#   anvil (npm @foundry-rs/anvil-linux-amd64) into .tools/ for the indexer tests, and rsyslog
#   with its TLS and RELP modules as the real syslog receiver of the SIEM tests (each test
#   starts its own instance; the package's system service is not needed), iproute2 for
#   the multi-host tests' network namespaces (usually present already), and iptables (its
#   iptables-legacy queues a host's packets for the latency fault; the kernel has no netem).
set -euo pipefail

DALP_DEPS_TEST="${DALP_DEPS_TEST:-${DALP_DEPS_ANVIL:-0}}"
DALP_DEB_PACKAGES=(postgresql-15 postgresql-client-15 postgresql-15-pgaudit etcd-server pgbouncer pgbackrest openssl python3-venv)
if [ "$DALP_DEPS_TEST" = 1 ]; then
  DALP_DEB_PACKAGES+=(rsyslog rsyslog-gnutls rsyslog-relp iproute2 iptables)
fi

missing=()
for p in "${DALP_DEB_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
# The machine image may carry the binaries without the package records.
if [ -x /usr/lib/postgresql/15/bin/postgres ]; then
  filtered=()
  for p in "${missing[@]}"; do [ "$p" = postgresql-15 ] || filtered+=("$p"); done
  missing=("${filtered[@]+"${filtered[@]}"}")
fi
if command -v psql >/dev/null 2>&1; then
  filtered=()
  for p in "${missing[@]}"; do [ "$p" = postgresql-client-15 ] || filtered+=("$p"); done
  missing=("${filtered[@]+"${filtered[@]}"}")
fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "error: need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Debian's postgresql-common would create and start a default cluster; dalp runs its own.
  $SUDO mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/dalp.conf >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Patroni, pinned (scripts/patroni-requirements.txt), in a virtualenv made from Debian's python3
# (the `postgres` user runs it, so it must not live under a private home such as pyenv's).
DALP_VENV="${DALP_VENV:-/opt/dalp/venv}"
DALP_PATRONI_REQ="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/patroni-requirements.txt"
DALP_PATRONI_VERSION=$(sed -n 's/^patroni\[[^]]*\]==//p' "$DALP_PATRONI_REQ")
if [ "$("$DALP_VENV/bin/patroni" --version 2>/dev/null)" != "patroni $DALP_PATRONI_VERSION" ]; then
  echo "installing Patroni $DALP_PATRONI_VERSION from PyPI into $DALP_VENV" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO mkdir -p "$DALP_VENV"
  [ -x "$DALP_VENV/bin/pip" ] || $SUDO /usr/bin/python3 -m venv "$DALP_VENV"
  $SUDO "$DALP_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$DALP_PATRONI_REQ" >&2
  $SUDO chmod -R a+rX "$DALP_VENV"
fi

# Test-only Python tools, pinned (scripts/test-requirements.txt): schemathesis, the API's
# contract fuzzer, and openapi-spec-validator, in their own virtualenv.
DALP_TEST_VENV="${DALP_TEST_VENV:-/opt/dalp/testvenv}"
DALP_TEST_REQ="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/test-requirements.txt"
if [ "$DALP_DEPS_TEST" = 1 ]; then
  want=$(grep -E '^[a-z]' "$DALP_TEST_REQ" | tr 'A-Z' 'a-z' | sort)
  have=$("$DALP_TEST_VENV/bin/pip" freeze 2>/dev/null | tr 'A-Z' 'a-z' | grep -E "^($(grep -Eo '^[a-z-]+' "$DALP_TEST_REQ" | paste -sd'|'))==" | sort || true)
  if [ "$want" != "$have" ]; then
    echo "installing test tools from PyPI into $DALP_TEST_VENV: $(echo $want)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO mkdir -p "$DALP_TEST_VENV"
    [ -x "$DALP_TEST_VENV/bin/pip" ] || $SUDO /usr/bin/python3 -m venv "$DALP_TEST_VENV"
    $SUDO "$DALP_TEST_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$DALP_TEST_REQ" >&2
  fi
fi
export DALP_TEST_VENV

# anvil (a real EVM node for the indexer's tests), from the npm registry, into .tools/.
# Only the test suite needs it (DALP_DEPS_TEST=1, set by test.sh); `dalp up` does not.
DALP_ANVIL_VERSION=1.7.1
DALP_TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.tools"
if [ "$DALP_DEPS_TEST" = 1 ] && [ ! -x "$DALP_TOOLS/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil" ]; then
  command -v npm >/dev/null 2>&1 || { echo "error: npm is needed to install anvil (@foundry-rs/anvil-linux-amd64)" >&2; exit 1; }
  echo "installing anvil $DALP_ANVIL_VERSION from npm into $DALP_TOOLS" >&2
  mkdir -p "$DALP_TOOLS"
  npm install --prefix "$DALP_TOOLS" --no-audit --no-fund --silent "@foundry-rs/anvil-linux-amd64@$DALP_ANVIL_VERSION" >&2
fi
export DALP_ANVIL="$DALP_TOOLS/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
