#!/usr/bin/env bash
# Installs Debian's chromium for the HTML report's browser test (tests/test_html_report.py).
# Idempotent: returns at once when a chromium is already on PATH, so CI pays the apt cost once per machine.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    chromium --version
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium
chromium --version
