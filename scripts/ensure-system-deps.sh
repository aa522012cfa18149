#!/usr/bin/env bash
# Debian packages the test suite needs: Chromium + its driver for the Airflow UI browser test.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium + chromium-driver are missing: install them (Debian: apt-get install chromium chromium-driver)" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
