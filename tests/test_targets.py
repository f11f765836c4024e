"""targets.py: the one resolver of class indices (engines, metrics, compat)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cfcam_gpu.targets import class_indices, resolve_targets


@pytest.mark.parametrize("targets", [3, np.int64(3), [3, 3, 3], (3, 3, 3), np.array([3, 3, 3]),
                                     torch.tensor([3, 3, 3], dtype=torch.int32)])
def test_accepted_forms(targets):
    got = class_indices(targets, 3, "cpu", num_classes=5)
    assert got.dtype == torch.long and got.tolist() == [3, 3, 3]


def test_top1_and_per_image():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 1.0]])
    assert resolve_targets(None, logits).tolist() == [1, 0]
    assert resolve_targets([2, 1], logits).tolist() == [2, 1]


@pytest.mark.parametrize("targets,exc,pattern", [
    (True, TypeError, "got a bool"),
    ([0.5, 1.0], TypeError, "integer class indices"),
    ([1, 2], ValueError, r"expected 3 class indices .* got shape \(2,\)"),
    (7, ValueError, r"class index in \[0, 5\), got 7"),
    ([0, 5, 1], ValueError, r"in \[0, 5\), got 5 for image index 1"),
    ([0, -1, 1], ValueError, r"got -1 for image index 1"),
])
def test_bad_targets_name_the_argument(targets, exc, pattern):
    with pytest.raises(exc, match=pattern):
        class_indices(targets, 3, "cpu", num_classes=5)


def test_without_num_classes_indices_are_not_bounded():
    assert class_indices([7, 9], 2, "cpu").tolist() == [7, 9]
