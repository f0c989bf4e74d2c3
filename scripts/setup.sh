#!/usr/bin/env bash
# Set up parclip on a fresh machine. Safe to run twice: every step skips what is already done.
#   - Debian's dataset-fashion-mnist (real images for the demo and tests), via apt when it is missing
#   - Debian's wordnet-base (WordNet 3.0 for the EDA captions of CleanCLIP/RoCLIP), via apt when it is missing
#   - a virtual environment in .venv with torch 2.14.1 + torchvision 0.29.1 (pinned together) and parclip[test]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages parclip reads at run time; only the missing ones are installed (one apt-get call).
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PKGS=()
[ -f "$FMNIST" ] || PKGS+=(dataset-fashion-mnist)
# WordNet 3.0 for the EDA captions of CleanCLIP/RoCLIP; a folder in $PARCLIP_WORDNET_DIR replaces it
[ -f /usr/share/wordnet/data.noun ] || [ -f "${PARCLIP_WORDNET_DIR:-/nonexistent}/data.noun" ] || PKGS+=(wordnet-base)
if [ ${#PKGS[@]} -gt 0 ]; then
  echo "[setup] installing Debian package(s) ${PKGS[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends "${PKGS[@]}" \
    || { echo "[setup] could not install ${PKGS[*]}: run 'sudo apt-get install ${PKGS[*]}'" >&2; exit 1; }
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (about 90 s; a CUDA build, about 6 GB in .venv)"
  # no pip cache: a second copy of the wheels would double the disk the install needs
  .venv/bin/pip install -q --disable-pip-version-check --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
    || { echo "[setup] installing torch failed; $(df -h --output=avail . | tail -1 | tr -d ' ') free here," \
              "and torch's CUDA build needs about 9 GB while it installs: free some space and run this again" >&2
         exit 1; }
fi
if ! .venv/bin/python -c "import parclip, pytest" 2>/dev/null || [ pyproject.toml -nt .venv/.parclip-installed ]; then
  echo "[setup] installing parclip (editable) with test extras"
  .venv/bin/pip install -q --disable-pip-version-check --no-cache-dir -e ".[test]"
  touch .venv/.parclip-installed
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, open_clip, parclip; print("torch", torch.__version__, "| open_clip", open_clip.__version__, "| parclip", parclip.__version__)')"
