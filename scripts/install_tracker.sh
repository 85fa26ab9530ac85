#!/usr/bin/env bash
# Install the BitTorrent tools Docket drives: opentracker (the tracker) and ctorrent (the peer).
# Debian/Ubuntu: from packages. Elsewhere: a source build into /usr/local (needs git, make, a C compiler, zlib).
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

if have opentracker && have ctorrent; then
  echo "opentracker and ctorrent are already installed."
  exit 0
fi

if have apt-get; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq opentracker ctorrent
  exit 0
fi

echo "No apt-get: building from source into /usr/local." >&2
for tool in git make cc; do
  have "$tool" || { echo "error: $tool is needed for a source build; install it first." >&2; exit 1; }
done
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cd "$build"
if ! have opentracker; then
  # opentracker needs libowfat; WANT_ACCESSLIST_WHITE matches the Debian build Docket expects (whitelist mode).
  git clone --depth 1 https://github.com/erdgeist/libowfat.git
  make -C libowfat
  git clone --depth 1 https://github.com/erdgeist/opentracker.git
  sed -i 's/^#FEATURES+=-DWANT_ACCESSLIST_WHITE/FEATURES+=-DWANT_ACCESSLIST_WHITE/' opentracker/Makefile
  make -C opentracker LIBOWFAT_HEADERS="$build/libowfat" LIBOWFAT_LIBRARY="$build/libowfat"
  $SUDO install -m 0755 opentracker/opentracker /usr/local/bin/opentracker
fi
if ! have ctorrent; then
  git clone --depth 1 https://github.com/rafi/ctorrent.git  # Enhanced CTorrent (dnh3.3.2)
  (cd ctorrent && ./configure && make)
  $SUDO install -m 0755 ctorrent/ctorrent /usr/local/bin/ctorrent
fi
echo "Installed: $(command -v opentracker) $(command -v ctorrent)"
