#!/usr/bin/env bash
# System packages the GUI tests need on a bare headless Debian/Ubuntu machine: Python's venv,
# a virtual X server (pytest-xvfb starts it) and the xcb/GL libraries PyQt6 and vispy load.
# Called by README.md's test command (Quick start, second line) and so by .ci/run.
# Does nothing where apt-get is missing (other systems: install the equivalents yourself).
set -euo pipefail
PACKAGES=(python3-venv python3-pip xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0
          libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-shape0 libegl1 libgl1
          libdbus-1-3 libfontconfig1)
if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get: install a virtual X server (Xvfb) and Qt's xcb libraries with your package manager" >&2
  exit 0
fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
echo "installing: ${missing[*]}"
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
