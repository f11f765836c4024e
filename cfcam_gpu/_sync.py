"""Where the library may read tensor values back to the host.

On the CPU such a read is free, so data-dependent shortcuts are taken: the screened route and its
sampled brackets, images clustered in groups, DBSCAN's early exit, a sampled percentile bracket, the
number of clusters that exist. On accelerators every shape is static and nothing is read back between
the backward pass and the returned CAMs. Every such decision asks ``host_reads_ok``; the tests turn it
off to run the accelerator path on CPU tensors (``tests/test_sync_free.py``).
"""
from __future__ import annotations

from torch import Tensor


def host_reads_ok(t: Tensor) -> bool:
    """True where reading ``t``'s values on the host costs nothing (CPU tensors)."""
    return t.device.type == "cpu"
