"""pytest-benchmark micro-benchmarks of CF-CAM's post-processing stages.

Not part of the default test run (``pytest tests/``); run them with::

    pytest bench/ --benchmark-group-by=group --benchmark-sort=name
    CFCAM_BENCH_FULL=1 pytest bench/          # also the largest size (C=2048, 28x28)
    CFCAM_BENCH_DEVICE=cuda pytest bench/     # on a GPU (synchronised inside the timed call)
    CFCAM_BENCH_THREADS=2 CFCAM_BENCH_B=4 pytest bench/

Sizes: C in {512, 1024, 2048} channels, h = w in {7, 14, 28}, B = 4 images (CFCAM_BENCH_B). Inputs are
synthetic but shaped like real ReLU activations: channels drawn around a few prototypes plus noise,
rectified, with some dead (all-zero) channels, so DBSCAN finds clusters, border points, noise and exact
duplicates. Stages are those of ``bench.stages`` (distances, percentile, dbscan, filter+weights, cam)
plus ``cfcam_from_features`` end to end. Each is timed on the previous stages' real outputs.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.stages import STAGES, stage_functions  # noqa: E402

FULL = os.environ.get("CFCAM_BENCH_FULL", "") not in ("", "0")
DEVICE = torch.device(os.environ.get("CFCAM_BENCH_DEVICE", "cpu"))
B = int(os.environ.get("CFCAM_BENCH_B", "4"))
ROUNDS = int(os.environ.get("CFCAM_BENCH_ROUNDS", "3"))
if os.environ.get("CFCAM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CFCAM_BENCH_THREADS"]))

CHANNELS = (512, 1024, 2048)
SIDES = (7, 14, 28)
# The largest combination costs ~10x the next one (float64 Gram of 4 x 2048 x 784): opt in.
BIG = {(2048, 28)}


def _sizes():
    for C in CHANNELS:
        for hw in SIDES:
            marks = [] if FULL or (C, hw) not in BIG else [
                pytest.mark.skip(reason="largest size: set CFCAM_BENCH_FULL=1")]
            yield pytest.param(C, hw, id=f"C{C}-{hw}x{hw}", marks=marks)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@functools.lru_cache(maxsize=2)
def features(C: int, hw: int, batch: int = B, seed: int = 0):
    """(activations, gradients) (batch, C, hw, hw) float32 on DEVICE, seeded and cluster-structured."""
    g = torch.Generator().manual_seed(seed * 1000 + C + hw)
    N = hw * hw
    K = 6
    protos = torch.rand(batch, K, N, generator=g) * 2.0
    assign = torch.randint(0, K, (batch, C), generator=g)
    scale = 0.5 + torch.rand(batch, C, 1, generator=g)
    acts = protos.gather(1, assign[:, :, None].expand(-1, -1, N)) * scale
    acts = (acts + 0.35 * torch.randn(batch, C, N, generator=g)).clamp_min_(0)
    dead = torch.rand(batch, C, generator=g) < 0.08
    acts[dead] = 0.0
    grads = 1e-3 * torch.randn(batch, C, N, generator=g)
    shape = (batch, C, hw, hw)
    return acts.reshape(shape).to(DEVICE), grads.reshape(shape).to(DEVICE)


@functools.lru_cache(maxsize=2)
def pipeline_state(C: int, hw: int):
    """Every stage's outputs for the size, computed once, so a single stage can be timed alone."""
    acts, grads = features(C, hw)
    fns = dict(stage_functions(acts, grads))
    state: dict = {}
    for name in STAGES:
        fns[name](state)
    _sync()
    return fns, state


def _run(benchmark, fn, C, hw, group):
    benchmark.group = group
    benchmark.extra_info.update(C=C, hw=hw, B=B, device=str(DEVICE), threads=torch.get_num_threads())

    def call():
        fn()
        _sync()

    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("C,hw", list(_sizes()))
def test_stage(benchmark, stage, C, hw):
    fns, state = pipeline_state(C, hw)
    scratch = dict(state)  # the stage overwrites its own outputs in this copy only
    _run(benchmark, lambda: fns[stage](scratch), C, hw, group=stage)


@pytest.mark.parametrize("C,hw", list(_sizes()))
def test_cfcam_from_features(benchmark, C, hw):
    from cfcam_gpu.cam import cfcam_from_features

    acts, grads = features(C, hw)
    _run(benchmark, lambda: cfcam_from_features(acts, grads), C, hw, group="cfcam_from_features")


@pytest.mark.parametrize("C,hw", [pytest.param(512, 7, id="C512-7x7")])
def test_stages_match_library(C, hw):
    """The staged pipeline computes what cfcam_from_features computes (else the breakdown misleads)."""
    from cfcam_gpu.cam import cfcam_from_features

    acts, grads = features(C, hw)
    _, state = pipeline_state(C, hw)
    res = cfcam_from_features(acts, grads)
    assert torch.equal(state["labels"], res.labels)
    torch.testing.assert_close(state["cams"], res.cams, rtol=0, atol=1e-6)


def test_cpu_passes_script_runs():
    """bench/cpu_passes.py's pairs and its two CPU routes run, and the routes agree (else it misleads)."""
    from bench.cpu_passes import cluster_pair, pairs

    acts, _ = features(256, 7)
    feats = acts.flatten(2).float()
    for fns in pairs(feats[0]).values():
        for fn in fns.values():
            fn()
    a, b = (f() for f in cluster_pair(feats).values())
    assert torch.equal(a.labels, b.labels) and torch.equal(a.eps, b.eps)
