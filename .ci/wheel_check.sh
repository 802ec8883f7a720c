#!/usr/bin/env bash
# The wheel ships what the CLI needs: build it, install it into a fresh venv (no edgecompress source on
# the path; dependencies borrowed from the dev venv through a .pth file, so nothing is downloaded twice),
# then run the CLI default (demo:vit-digits + the shipped uniform_w8a8 recipe) from an empty directory.
set -euo pipefail
VENV=${1:-.venv}
ROOT=$(pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$VENV/bin/pip" wheel -q --no-deps --no-build-isolation -w "$WORK/dist" . >/dev/null
python3 -m venv "$WORK/venv"
DEPS=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$DEPS" > "$SITE/edgecompress-dev-deps.pth"
"$WORK/venv/bin/pip" install -q --no-deps --no-index "$WORK"/dist/edgecompress-*.whl
mkdir "$WORK/empty" && cd "$WORK/empty"
LOC=$("$WORK/venv/bin/python" -c "import edgecompress, os; print(os.path.dirname(edgecompress.__file__))")
case "$LOC" in "$ROOT"*) echo "wheel check: edgecompress imported from the source tree ($LOC)"; exit 1;; esac
"$WORK/venv/bin/edgecompress" compress --out "$WORK/empty/out" --set eval.samples=64 | tail -2
test -f "$WORK/empty/out/model.safetensors"
echo "wheel check: OK (installed from the wheel at $LOC; ran the CLI default from an empty directory)"
