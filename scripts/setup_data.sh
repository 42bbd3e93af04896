#!/usr/bin/env bash
# Install the Debian data packages the demo and tests use (real images, offline once installed).
# Needs root (as on the project machines and CI); without it, tests that need the data skip.
set -uo pipefail
PKGS="dataset-fashion-mnist fonts-noto-color-emoji"
missing=""
for p in $PKGS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [[ -z "$missing" ]]; then
    echo "[data] Debian data packages present:$PKGS"
    exit 0
fi
if [[ "$(id -u)" != "0" ]] || ! command -v apt-get >/dev/null; then
    echo "[data] cannot install$missing (need root + apt-get); dependent tests will skip" >&2
    exit 0
fi
echo "[data] installing$missing"
apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null || {
    echo "[data] apt-get install of$missing failed; dependent tests will skip" >&2
    exit 0
}
