#!/usr/bin/env bash
# Render a lowbit report.html in headless Chromium and save a PNG (to check the plots show).
#   bash scripts/screenshot_report.sh out/run-smollm2/report.html out/run-smollm2/report.png
# Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
html=$(realpath "$1"); png=${2:-${1%.html}.png}
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1200,3000 --screenshot="$(realpath -m "$png")" "file://$html" 2>/dev/null
rm -rf "$profile"
echo "$png"
