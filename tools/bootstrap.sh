#!/usr/bin/env bash
# Installs what the build and the host tests need, idempotently: Debian packages from
# tools/host-packages.txt, then a virtualenv in .venv with the package (editable), its
# dev tools and the benchmark's chart library. Re-running does nothing when everything is
# present.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

mapfile -t wanted < <(grep -vE '^\s*(#|$)' tools/host-packages.txt)
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing ${missing[*]}"
    tools/apt-install "${missing[@]}" 2>/dev/null
fi

python=${PYTHON:-python3}
stamp=.venv/.bootstrap-stamp
inputs=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
if [[ ! -f $stamp || $(cat "$stamp") != "$inputs" ]]; then
    # pip warns about every index location of the machine's pip config it cannot use.
    quiet_pip() { .venv/bin/pip "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
    quiet_pip install -q --upgrade pip
    quiet_pip install -q -e '.[dev,bench]'
    .venv/bin/python -c 'import zerofs_csi.nbd._nbd, Cython' # fail here, not later, if it did not
    echo "$inputs" >"$stamp"
fi
