#!/usr/bin/env bash
# Installs what the build and the host tests need, idempotently: Debian packages from
# tools/host-packages.txt, then a virtualenv in .venv with the package (editable) and its
# dev tools. Re-running does nothing when everything is present.
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
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
stamp=.venv/.bootstrap-stamp
inputs=$(cat pyproject.toml setup.py | sha256sum | cut -d' ' -f1)
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
if [[ ! -f $stamp || $(cat "$stamp") != "$inputs" ]]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    echo "$inputs" >"$stamp"
fi
