"""`pipeline.models.roi_align`: the sparse RoIAlign backward against torchvision's kernel."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from pipeline.models.roi_align import SparseGradRoIAlign

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# the sparse RoIAlign gradient, the FPN width, the RoI budget


def _pools(output_size: int) -> tuple[MultiScaleRoIAlign, SparseGradRoIAlign]:
    reference = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2)
    sparse = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size, 2)
    sparse.__class__ = SparseGradRoIAlign
    sparse.sparse_grad = True
    return reference, sparse


@pytest.mark.parametrize("output_size", [7, 14])
def test_sparse_roi_align_gradient_is_torchvision_s(output_size):
    """Forward: torchvision's values exactly; backward: its gradient to float rounding, at every FPN level,
    for RoIs at the image's edges, under a pixel and over the whole image."""
    gen = torch.Generator().manual_seed(output_size)
    features = {str(i): torch.randn(3, 8, 256 // 2**i, 192 // 2**i, generator=gen) for i in range(4)}
    xy = torch.rand(60, 2, generator=gen) * torch.tensor([760.0, 1010.0])
    wh = torch.rand(60, 2, generator=gen) ** 3 * 1000 + 0.2
    boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([768.0, 1024.0]))], 1)
    boxes[:3] = torch.tensor([[0.0, 0.0, 768.0, 1024.0], [767.5, 1023.5, 768.0, 1024.0], [0.0, 0.0, 0.3, 0.3]])
    boxes = [boxes[:25], boxes[25:26], boxes[26:]]
    shapes = [(1024, 768)] * 3
    reference, sparse = _pools(output_size)
    ours = {k: v.clone().requires_grad_() for k, v in features.items()}
    theirs = {k: v.clone().requires_grad_() for k, v in features.items()}
    out, expected = sparse(ours, boxes, shapes), reference(theirs, boxes, shapes)
    assert torch.equal(out, expected)
    grad = torch.randn(expected.shape, generator=gen)
    out.backward(grad)
    expected.backward(grad)
    for level in features:
        assert theirs[level].grad.abs().max() > 0, level  # every level pooled something
        torch.testing.assert_close(ours[level].grad, theirs[level].grad, rtol=0, atol=1e-4)
    with torch.no_grad():  # inference and a module left off are torchvision's own
        assert torch.equal(sparse(features, boxes, shapes), reference(features, boxes, shapes))
