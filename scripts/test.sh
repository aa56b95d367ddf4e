#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
# The plugin tests open a real napari viewer, on a virtual screen (Xvfb + Mesa).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for cmd in xvfb-run; do command -v "$cmd" >/dev/null || need_apt=1; done
[ -e /usr/lib/x86_64-linux-gnu/libxkbcommon-x11.so.0 ] || need_apt=1
if [ "$need_apt" = 1 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4 \
        libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
        libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 >/dev/null
fi
bash scripts/setup.sh dev
xvfb-run -a -s "-screen 0 1400x900x24" python3 -m pytest -q "$@"
