#!/usr/bin/env bash
# Install redis-server from the distribution's packages (Debian/Ubuntu), as root or via sudo.
set -euo pipefail
if command -v redis-server >/dev/null; then exit 0; fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
  echo "redis-server is missing and we are not root: install it (apt-get install -y redis-server)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "redis-server is missing: install it with your package manager" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq redis-server >/dev/null 2>&1 || {
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq redis-server >/dev/null
}
command -v redis-server >/dev/null
