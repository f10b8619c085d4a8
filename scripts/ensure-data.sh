#!/usr/bin/env bash
# Make sure Fashion-MNIST is readable: already there, else Debian's dataset-fashion-mnist, else the official download.
set -euo pipefail
venv=${1:-.venv}
found() { "$venv/bin/python" -c "from randteach.data import load_dataset; load_dataset('fashion-mnist', 'test')" 2>/dev/null; }
found && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || true
  found && exit 0
fi
echo "Fashion-MNIST: downloading from the official source"
"$venv/bin/randteach" data fetch fashion-mnist
