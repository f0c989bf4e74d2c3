#!/usr/bin/env bash
# Wheels of what parclip needs beyond a stock GPU image (PyTorch, torchvision, timm, safetensors, huggingface-hub,
# regex, tqdm, PyYAML, Pillow already there), for a GPU machine that cannot reach PyPI: run here, where pip works,
# then carry .whl/ to that machine and install from it without an index (docs/gpu_check.md):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
# The versions are those of this checkout's .venv when it has one (what the suite ran with), else the newest.
# The target: x86-64 Linux, CPython $GPU_PYTHON (default 3.12, the GPU image's); wcwidth has a binary wheel (abi3).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(open_clip_torch ftfy wcwidth webdataset braceexpand)
SPECS=()
for p in "${PKGS[@]}"; do
  v=$( (.venv/bin/pip show "$p" 2>/dev/null || true) | sed -n 's/^Version: //p')
  SPECS+=("$p${v:+==$v}")
done
mkdir -p .whl
PIP=${PIP:-$( [ -x .venv/bin/pip ] && echo .venv/bin/pip || echo "python3 -m pip")}
$PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
  --python-version "${GPU_PYTHON:-3.12}" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${SPECS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
echo "[gpu_wheels] $(ls .whl | tr '\n' ' ')($(du -sh .whl | cut -f1))"
