"""Non-negative matrix factorisation X ~ W H by coordinate descent, batched on the tensor's device.

Matches scikit-learn's ``NMF(n_components, init="random", random_state, solver="cd", tol, max_iter)``
(Frobenius loss, no regularisation, no shuffling): the initial factors are avg * |N(0, 1)| with
avg = sqrt(mean(X) / K), drawn from NumPy's ``RandomState(random_state)`` as scikit-learn does (H's
draws first, then W's; the normals depend only on the shapes, so they are made on the host and copied to
the device, and no value is read back); then alternating sweeps, W's columns one after the other
(each column of all rows at once: exactly scikit-learn's order of updates), then H's, each sweep with
HH^T and XH^T formed once. Stop: after the first sweep whose summed absolute projected gradient is at
most ``tol`` times the first sweep's, or after ``max_iter`` sweeps. With ``sync_free`` (accelerators by
default) all ``max_iter`` sweeps run and the factors are frozen once converged (same result, no host
read); otherwise the test reads the host once per sweep.
Shapes: X (n, m), W (n, K), H (K, m).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .._checks import check_ndim, check_floating, decide_sync_free


def random_init(X: Tensor, K: int, random_state: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's ``init="random"``: W (n, K), H (K, m) = avg * |N(0, 1)| in X's dtype."""
    n, m = X.shape
    rng = np.random.RandomState(random_state)
    normals_h = rng.standard_normal(size=(K, m))
    normals_w = rng.standard_normal(size=(n, K))
    dtype = np.float64 if X.dtype == torch.float64 else np.float32
    avg = (X.mean() / K).sqrt()
    H = (avg * torch.from_numpy(normals_h.astype(dtype)).to(X.device)).abs()
    W = (avg * torch.from_numpy(normals_w.astype(dtype)).to(X.device)).abs()
    return W, H


def _sweep(X: Tensor, W: Tensor, Ht: Tensor) -> tuple[Tensor, Tensor]:
    """One pass over W's columns minimising |X - W Ht^T|: X (n, m), W (n, K), Ht (m, K) -> new W, violation."""
    HHt = Ht.T @ Ht
    XHt = X @ Ht
    violation = torch.zeros((), dtype=X.dtype, device=X.device)
    W = W.clone()
    for t in range(W.shape[1]):
        grad = W @ HHt[:, t] - XHt[:, t]
        pg = torch.where(W[:, t] == 0, grad.clamp_max(0), grad)
        violation = violation + pg.abs().sum()
        hess = HHt[t, t]
        step = torch.where(hess != 0, (W[:, t] - grad / torch.where(hess != 0, hess, 1)).clamp_min(0), W[:, t])
        W[:, t] = step
    return W, violation


def nmf(X: Tensor, n_components: int, max_iter: int = 200, tol: float = 1e-4, random_state: int = 0,
        sync_free: bool | None = None) -> tuple[Tensor, Tensor]:
    """X (n, m) non-negative -> W (n, K), H (K, m) in X's floating dtype (float32 for half precision)."""
    check_ndim(X, 2, "X", "(n, m)")
    check_floating(X, "X")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components: expected an int >= 1, got {n_components!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
    sync_free = decide_sync_free(sync_free, X)
    X = X if X.dtype == torch.float64 else X.float()
    W, H = random_init(X, n_components, random_state)
    Ht = H.T.contiguous()
    done = torch.zeros((), dtype=torch.bool, device=X.device)
    first = None
    for _ in range(max_iter):
        W_new, v_w = _sweep(X, W, Ht)
        Ht_new, v_h = _sweep(X.T, Ht, W_new)
        violation = v_w + v_h
        W, Ht = torch.where(done, W, W_new), torch.where(done, Ht, Ht_new)
        first = violation if first is None else first
        done = done | (first == 0) | (violation <= tol * first)
        if not sync_free and bool(done):
            break
    return W, Ht.T
