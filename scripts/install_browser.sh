#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver for the HTML-report browser test
# (tests/test_analysis_browser.py). Idempotent: returns at once when both are present.
#   bash scripts/install_browser.sh
# Needs root (or sudo) and the Debian package mirror; never downloads a browser at test time.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: apt-get not found; install Chromium and ChromeDriver yourself (the browser test is skipped without them unless PEFTLAB_REQUIRE_BROWSER is set)" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_browser.sh: not root and no passwordless sudo; skipping the Chromium install" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
