#!/usr/bin/env bash
# Make pytorch-grad-cam available to bench/gpu.sh on a machine without a package registry.
#
#   bash bench/vendor_pgc.sh            # writes ./wheels/ (about 0.7 MB), nothing downloaded
#
# Copies, from this machine only: the grad-cam wheel pip built into its cache (if there), and the
# installed, pure-Python packages pytorch_grad_cam and ttach (its import-time dependency) into
# wheels/site/. gpu.sh tries an installed grad-cam first, then wheels/*.whl, then wheels/site.
# wheels/ is not tracked: keep it out of git (echo /wheels/ >> .git/info/exclude) and name it in the
# device tool's `carry` list.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
mkdir -p wheels/site
found=$(find "${PIP_CACHE_DIR:-$HOME/.cache/pip}" -name 'grad_cam-*-py3-none-any.whl' 2>/dev/null | head -1 || true)
if [ -n "$found" ]; then cp "$found" wheels/ && echo "copied $(basename "$found")"; fi
for pkg in pytorch_grad_cam ttach; do
  src=$("$PY" -c "import $pkg, os; print(os.path.dirname($pkg.__file__))")
  rm -rf "wheels/site/$pkg"
  cp -r "$src" "wheels/site/$pkg"
  find "wheels/site/$pkg" -name __pycache__ -prune -exec rm -rf {} +
  echo "copied $pkg from $src"
done
du -sh wheels
