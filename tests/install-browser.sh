#!/usr/bin/env bash
# Debian's chromium and its WebDriver, for the review page's browser test (tests/cli/test_review.py
# runs this when /usr/bin/chromedriver is missing; root only, as CI runs). Nothing else needs them.
set -euo pipefail
command -v chromedriver >/dev/null && command -v chromium >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; } \
  || { echo "apt-get install chromium chromium-driver failed; install them, then rerun" >&2; exit 1; }
