#!/usr/bin/env bash
# Install Debian's Chromium and its chromedriver for the real-browser test (tests/comfyui/test_comfy_browser.py;
# selenium itself comes from the project's `test` extra). Used by run_tests.sh, so CI (`bash .ci/run`, root,
# fresh clone) gets them.
#
# Best effort and quiet: it does nothing when both are already on PATH or ACT_SKIP_BROWSER_SETUP=1, and it
# gives up with one line (exit 0) when apt-get is missing, the user is not root (and has no password-less
# sudo), or apt cannot install them (no network, no such package, a held lock). The browser test then skips
# and says why. Nothing is downloaded outside apt: selenium is pointed at the system chromedriver.
set -uo pipefail

say() { echo "setup_browser: $*" >&2; }

if [ "${ACT_SKIP_BROWSER_SETUP:-}" = "1" ]; then
  exit 0
fi
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "no apt-get here: install Chromium and chromedriver yourself for the browser test (it skips meanwhile)"
  exit 0
fi
if [ "$(id -u)" = "0" ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  say "not root: run 'apt-get install chromium chromium-driver' as root for the browser test (it skips meanwhile)"
  exit 0
fi

packages=(chromium chromium-driver)
apt_get=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -y -q -o Acquire::Retries=1
  -o Acquire::http::Timeout=20 -o DPkg::Lock::Timeout=60)
say "installing ${packages[*]} with apt-get"
# The package lists of a fresh image are often empty: update only when the install cannot find the packages.
if ! "${apt_get[@]}" install "${packages[@]}" >/dev/null 2>&1; then
  if ! "${apt_get[@]}" update >/dev/null 2>&1 || ! "${apt_get[@]}" install "${packages[@]}" >/dev/null 2>&1; then
    say "apt-get could not install ${packages[*]} (no network?): the browser test skips"
    exit 0
  fi
fi
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  say "$(chromium --version 2>/dev/null || echo chromium) and chromedriver installed"
else
  say "apt-get ran but chromium or chromedriver is still not on PATH: the browser test skips"
fi
exit 0
