#!/usr/bin/env bash
# Install Debian's headless-capable chromium for the report page test (tests/test_report.py). Needs root;
# does nothing when chromium is already on PATH. Prints the browser path as its last line.
set -euo pipefail
for b in chromium chromium-browser; do
  if command -v "$b" >/dev/null; then command -v "$b"; exit 0; fi
done
if [ "$(id -u)" != 0 ]; then echo "install_chromium.sh: needs root to apt-get install chromium" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
