#!/usr/bin/env bash
# Installs what the test suite needs from Debian's packages: Chromium (browser tests, driven headless) and a
# PostgreSQL server (the shared session/draft store tests start their own throwaway cluster).
# Idempotent and quick when everything is already there. Needs root (CI and our machines run as root).
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-liberation)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then need+=(postgresql); fi
command -v node >/dev/null 2>&1 || need+=(nodejs npm)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: need root to install: ${need[*]} (apt-get install ${need[*]})" >&2
  exit 1
fi
echo "install-system-deps: installing ${need[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
