#!/bin/sh
# System packages the test suite needs beyond PyPI: Chromium for tests/test_report.py (headless, offline).
# Idempotent: does nothing when Chromium is already installed. Run as root (CI images) or with sudo.
set -eu

if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium || echo /usr/bin/chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
command -v chromium
