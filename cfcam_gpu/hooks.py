"""Hooks on the target layer and the model's train/eval state: each written once, used by every engine.

- ``model_lock(model)``: the model's own re-entrant lock. Every engine call holds it from the moment it
  attaches its hooks until it has removed them and restored the mode, so engines sharing one model in
  several threads take turns: each call sees only its own forward pass, in eval mode.
- ``eval_mode(model)``: eval mode inside (holding ``model_lock``), every submodule's own ``training``
  flag restored afterwards (also on error; a frozen BatchNorm inside a training model stays frozen).
- ``LeafCapture``: the engine's forward hook; the layer output becomes an autograd leaf.
- ``PipelineCapture``: the hook of ``with cam:`` / ``cam.explain(logits)``; keeps the caller's output.
- ``capture_hook(fn)``: a hook that ``torch.compile`` never traces (a graph break), without importing
  ``torch._dynamo`` when nothing was compiled.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its RLock
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock of ``model`` (made on first use, dropped with the model). Re-entrant: an engine call that
    holds it may run other engine calls on the same model in the same thread."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; every submodule's own mode restored on exit (also on error).
    Holds ``model_lock(model)``: another thread's block on the same model waits, so that no thread
    saves a mode another thread set or runs a forward in a mode another thread restored."""
    with model_lock(model):
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            yield model
        finally:
            for module, training in modes:
                module.training = training


def capture_hook(fn: Callable) -> Callable:
    """``fn`` as a forward hook that ``torch.compile`` never traces.

    Dynamo is imported only by code that compiles: when it was never imported no compiled code can run
    the hook, so ``fn`` is returned as is and ``import cfcam_gpu`` stays free of ``torch._dynamo``.
    """
    if "torch._dynamo" not in sys.modules:
        return fn
    return torch.compiler.disable(fn)


def _leaf(output: Tensor) -> Tensor:
    """A new graph leaf, unless the output already depends on an earlier target layer's leaf (several
    target layers): then it stays in that graph, so the gradient reaches both."""
    return output if output.requires_grad else output.detach().requires_grad_(True)


class LeafCapture:
    """Forward hook that keeps the layer's output as a graph leaf and turns grad mode back on there.

    The model runs under ``no_grad``; at the target layer the output is detached into a leaf that requires
    grad, so autograd records only the layers above it: no graph, no saved tensors and no backward below
    the layer, whatever the parameters' requires_grad. With several target layers only the first one to
    run is cut; the later ones are kept as they are in the graph above it. ``grad=False`` (a gradient-free
    method): the output is kept detached and grad mode stays off, so no graph is recorded at all.
    """

    def __init__(self, grad: bool = True):
        self.output: Tensor | None = None
        self.grad = grad

    def _keep(self, t: Tensor) -> Tensor:
        return _leaf(t) if self.grad else t.detach()

    def __call__(self, module, inputs, output):
        if isinstance(output, dict) and output and all(isinstance(v, Tensor) for v in output.values()):
            if self.grad:
                torch.set_grad_enabled(True)  # a dict of feature maps (an FPN backbone): one leaf per entry
            self.output = type(output)((k, self._keep(v)) for k, v in output.items())
            return type(output)((k, v.clone()) for k, v in self.output.items())
        if not isinstance(output, Tensor):
            raise ValueError(f"target_layer: expected the layer to output a tensor (B, C, h, w) or a dict of "
                             f"tensors (with a reshape_transform), got {type(output).__name__}; pick a layer "
                             f"that returns one tensor")
        if self.grad:
            torch.set_grad_enabled(True)
        self.output = self._keep(output)
        return self.output.clone()  # later in-place ops (ReLU(inplace=True), +=) must not touch the kept one


class PipelineCapture:
    """Forward hook for ``explain``: keeps the layer output of the caller's own forward pass.

    It hands the rest of the model a clone, so in-place ops after the layer cannot change the values or
    the autograd version of the kept tensor. In a model the caller compiled, the graph breaks here, so
    the kept tensor is an input of the graph above the layer and ``autograd.grad`` can reach it.
    """

    def __init__(self):
        self.output: Tensor | None = None

    def __call__(self, module, inputs, output):
        if isinstance(output, Tensor):
            self.output = output
            return output.clone()
        return None


@contextlib.contextmanager
def forward_hook(layer: nn.Module, hook: Callable) -> Iterator[None]:
    """``hook`` registered on ``layer`` (through ``capture_hook``) inside the block, removed on exit."""
    handle = layer.register_forward_hook(capture_hook(hook))
    try:
        yield
    finally:
        handle.remove()
