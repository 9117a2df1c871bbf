#!/usr/bin/env bash
# Stage the wheels bench/gpu_check.sh needs on the lent GPU machine, whose image (Python 3.12, torch,
# transformers, lightning, torchmetrics, tensorboard, pyarrow >= 24) lacks jsonargparse, datasets and
# torchdata, and its transformers (5.17 on 2026-11-17) is older than the one the tests run, so this machine's
# transformers travels too, with the regex it checks at import. Downloads them, without dependencies, for CPython PY (default 3.12) on x86-64 Linux into
# DEST (default .whl, git-ignored through .git/info/exclude); the device installs them with
#   WHEELS=.whl bash bench/gpu_check.sh        (the device call carries [".whl"]; ~16 MB)
# Versions are this machine's, so the device runs what the tests ran.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PY:-3.12}
mkdir -p .git/info "$DEST"
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
version() { python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
packages=()
for name in jsonargparse docstring_parser typeshed_client datasets dill multiprocess torchdata transformers regex; do
  packages+=("$name==$(version "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${packages[@]}"
ls "$DEST"
