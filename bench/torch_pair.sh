#!/usr/bin/env bash
# What the torch/torchvision pair costs on a fresh machine: the pinned CPU torch 2.13.0 with the only
# torchvision for it (0.28.0, a CUDA build, which needs unsupft/_torchvision.py on the CPU), against
# the matched pair torch 2.14.1 + torchvision 0.29.1 (CUDA builds, what `pip install torch
# torchvision` gives any Linux user). Each pair goes into a fresh venv with pip's cache off; the
# wheels come from this machine's local indexes, so the times are install times, not downloads.
# Prints per pair: install seconds, venv size, `import torch`
# seconds and peak RSS (3 runs each), and whether a plain `import torchvision` works (its nms op).
#   bash bench/torch_pair.sh [SCRATCH_DIR]
set -euo pipefail
scratch=${1:-/tmp/unsupft-torch-pair}
rm -rf "$scratch" && mkdir -p "$scratch"
for pair in "torch==2.13.0 torchvision==0.28.0" "torch==2.14.1 torchvision==0.29.1"; do
  venv="$scratch/$(echo "$pair" | tr -c 'a-z0-9.\n' '_')"
  python3 -m venv "$venv"
  start=$(date +%s.%N)
  "$venv/bin/pip" install -q --no-cache-dir --disable-pip-version-check $pair >"$venv.log" 2>&1
  end=$(date +%s.%N)
  echo "== $pair"
  echo "install_s $(echo "$end - $start" | bc)"
  echo "venv_MB $(du -sm "$venv" | cut -f1)"
  "$venv/bin/python" -c "import importlib.metadata as m; print('versions', m.version('torch'), m.version('torchvision'))"
  for _ in 1 2 3; do
    /usr/bin/time -f "import_torch_s %e rss_MB %M" "$venv/bin/python" -c "import torch" 2>&1 | \
      awk '{print $1, $2, $3, int($4 / 1024)}'
  done
  "$venv/bin/python" -c "import torch, torchvision; torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5); print('plain import torchvision: works')" \
    2>/dev/null || echo "plain import torchvision: fails (operator torchvision::nms does not exist)"
done
rm -rf "$scratch"
