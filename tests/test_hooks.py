"""hooks.py: eval-mode restore, hook removal on error, and no torch._dynamo unless something compiles."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cfcam_gpu.hooks import LeafCapture, eval_mode, forward_hook


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_eval_mode_restores_every_submodule_also_on_error():
    net = _net().train()
    net[1].eval()  # a frozen BatchNorm inside a training model
    before = [m.training for m in net.modules()]
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == before
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(net):
            raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == before


def test_forward_hook_is_removed_after_an_exception():
    net = _net()
    net(torch.rand(1, 3, 8, 8))  # materialise the lazy layer
    capture = LeafCapture()
    with pytest.raises(RuntimeError, match="boom"):
        with forward_hook(net[0], capture):
            assert len(net[0]._forward_hooks) == 1
            with torch.no_grad():
                net(torch.rand(2, 3, 8, 8))
            raise RuntimeError("boom")
    assert len(net[0]._forward_hooks) == 0
    assert capture.output is not None and capture.output.requires_grad and capture.output.is_leaf


def test_engine_leaves_no_hook_when_the_layer_output_is_not_a_tensor():
    import cfcam_gpu as cg

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.head = Pair(), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.pair(x)[0].mean(dim=(2, 3)))

    net = Net().train()
    with pytest.raises(ValueError, match="target_layer: expected the layer to output a tensor"):
        cg.CFCAM(net, "pair")(torch.rand(2, 3, 4, 4))
    assert len(net.pair._forward_hooks) == 0 and net.training


def test_a_cam_without_compile_never_imports_dynamo():
    """``import cfcam_gpu`` and an uncompiled CAM pull in no torch._dynamo (about 3 s of import)."""
    code = ("import sys, torch, cfcam_gpu as cg\n"
            "net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),"
            " torch.nn.Flatten(), torch.nn.Linear(8, 2))\n"
            "cg.CFCAM(net, '0')(torch.rand(2, 3, 9, 9))\n"
            "heavy = [m for m in ('torch._dynamo', 'sklearn', 'cv2', 'matplotlib', 'timm', 'scipy', 'skimage')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr
