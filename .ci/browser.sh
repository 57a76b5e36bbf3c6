#!/usr/bin/env bash
# Prepare the browser tests (pytest -m browser): Debian's chromium + the Python playwright package.
#
#   .ci/browser.sh [PYTHON]      # PYTHON defaults to .venv/bin/python
#
# Playwright is only the driver: the tests launch /usr/bin/chromium through executable_path and never
# download browsers (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1; `playwright install` is never run).
set -euo pipefail
log() { echo "[browser.sh] $*" >&2; }
PY="${1:-.venv/bin/python}"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

if [ ! -x /usr/bin/chromium ]; then
  log "installing Debian's chromium"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi
if ! "$PY" -c "import playwright" 2>/dev/null; then
  log "installing the playwright Python package"
  "$PY" -m pip install -q playwright
fi
/usr/bin/chromium --version >&2
"$PY" - <<'PYEOF'
from playwright.sync_api import sync_playwright
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
    page = b.new_page()
    page.set_content("<p id=x>ok</p>")
    assert page.inner_text("#x") == "ok"
    b.close()
print("[browser.sh] playwright drives /usr/bin/chromium: ok")
PYEOF
