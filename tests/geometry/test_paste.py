"""The paste (paste.paste_masks_tensor), batched products and box by box, against torchvision's per-mask loop,
bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.geometry.paste as paste_module
from pipeline.geometry.paste import paste_masks, paste_masks_reference, paste_masks_tensor

M = 28


def _batched(maps, boxes, hw, threshold=0.5) -> np.ndarray:
    """The batched products' paste (a GPU's default) on the CPU, as numpy."""
    return paste_masks_tensor(maps, boxes, hw, threshold, batched=True).numpy()


def _boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Boxes of every kind the paste meets: inside, across the border, tiny (under a pixel), as large as the
    image, of side 28 (the expanded box is then 30 = the padded map: torch's copy path)."""
    kind = rng.integers(0, 5, n)
    x0 = rng.uniform(-0.3 * width, width, n)
    y0 = rng.uniform(-0.3 * height, height, n)
    w = np.where(kind == 0, rng.uniform(0.0, 1.5, n), rng.uniform(1, 1.2 * width, n))
    h = np.where(kind == 0, rng.uniform(0.0, 1.5, n), rng.uniform(1, 1.2 * height, n))
    w = np.where(kind == 1, 28.0, w)
    h = np.where(kind == 1, 28.0, h)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    boxes[kind == 2] = [0, 0, width, height]
    # the detector clips its boxes to the image
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes.astype(np.float32)


def _maps(rng: np.random.Generator, n: int) -> np.ndarray:
    """uint8 maps: noise, smooth blobs, and flat 127 | 128 halves (bilinear mid-points are exact ties at 0.5)."""
    kind = rng.integers(0, 3, n)
    noise = rng.integers(0, 256, (n, M, M))
    yy, xx = np.mgrid[:M, :M] / (M - 1)
    cy, cx, r = rng.uniform(0, 1, (3, n, 1, 1))
    blob = 255 / (1 + np.exp(((yy - cy) ** 2 + (xx - cx) ** 2 - r**2 / 4) * 40))
    halves = np.where(rng.integers(0, 2, (n, M, M)) > 0, 127, 128)
    return np.select([kind[:, None, None] == 0, kind[:, None, None] == 1], [noise, blob], halves).astype(np.uint8)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hw", [(128, 128), (37, 90), (240, 61)])
def test_paste_is_the_loop_bit_for_bit(seed, hw, batched):
    rng = np.random.default_rng(seed)
    n = 40
    maps, boxes = _maps(rng, n), _boxes(rng, n, *hw)
    got = paste_masks_tensor(maps, boxes, hw, batched=batched).numpy()
    want = paste_masks_reference(maps, boxes, hw).numpy()
    assert got.dtype == bool and got.shape == (n, *hw)
    assert np.array_equal(got, want)


def test_float_maps_and_other_thresholds():
    rng = np.random.default_rng(7)
    maps, boxes = _maps(rng, 30).astype(np.float32) / 255.0, _boxes(rng, 30, 64, 80)
    for threshold in (0.5, 0.3, 0.9):
        got = _batched(maps, boxes, (64, 80), threshold)
        assert np.array_equal(got, paste_masks_reference(maps, boxes, (64, 80), threshold).numpy())


def test_ties_are_left_to_torchvision(monkeypatch):
    """Flat 127 | 128 maps put pixels exactly on 0.5 in real arithmetic: those masks take torchvision's resize
    (inside their boxes), the rest not."""
    calls = []
    real = paste_module._paste_in_boxes
    monkeypatch.setattr(paste_module, "_paste_in_boxes", lambda m, *a, **k: calls.append(len(m)) or real(m, *a, **k))
    maps = np.zeros((3, M, M), dtype=np.uint8)
    maps[0, :, : M // 2] = 127
    maps[0, :, M // 2 :] = 128  # a 127 | 128 edge resized x2: mid-points (127 + 128) / 2 / 255 = 0.5
    maps[1] = 200  # flat: 0.5 only on the zero ring's slope, at a weight 51/80 no float32 weight is
    maps[2, :, : M // 2] = 230  # an edge between 230 and 200: no value near 0.5 but on that slope
    maps[2, :, M // 2 :] = 200
    boxes = np.array([[10, 10, 66, 66], [0, 0, 20, 20], [5, 5, 40, 50]], dtype=np.float32)
    got = _batched(maps, boxes, (80, 80))
    assert calls == [1]  # only the tied mask, alone
    assert np.array_equal(got, paste_masks_reference(maps, boxes, (80, 80)).numpy())


@pytest.mark.parametrize("hw", [(800, 800), (333, 517)])
def test_tied_masks_at_lvis_size_are_the_loop_bit_for_bit(hw):
    """Maps near 0.5 everywhere (a randomly initialised mask head): nearly every mask has a tie and is resized
    again inside its box, including boxes across the image's border and under a pixel."""
    rng = np.random.default_rng(17)
    n = 24
    maps = np.clip(np.round(255 / (1 + np.exp(-rng.normal(0, 0.05, (n, M, M))))), 0, 255).astype(np.uint8)
    boxes = _boxes(rng, n, *hw)
    calls = []
    real = paste_module._paste_in_boxes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(paste_module, "_paste_in_boxes", lambda m, *a, **k: calls.append(len(m)) or real(m, *a, **k))
        got = _batched(maps, boxes, hw)
    assert calls and calls[0] > n // 2
    assert np.array_equal(got, paste_masks_reference(maps, boxes, hw).numpy())


def test_a_threshold_at_zero_keeps_torchvisions_whole_paste():
    """At a threshold of 0 or below torchvision's 0 outside the box passes: torchvision's whole paste."""
    rng = np.random.default_rng(19)
    maps, boxes = _maps(rng, 10), _boxes(rng, 10, 40, 50)
    for threshold in (0.0, 1e-7, -2e-6, -0.5):
        want = paste_masks_reference(maps, boxes, (40, 50), threshold).numpy()
        assert np.array_equal(_batched(maps, boxes, (40, 50), threshold), want)
        assert np.array_equal(paste_masks(maps, boxes, (40, 50), threshold), want)


def test_the_cpu_pastes_box_by_box(monkeypatch):
    """On the CPU the default is torchvision's resize inside each box (no image-sized products), the same bits,
    for uint8 and float maps and any threshold."""
    monkeypatch.setattr(paste_module, "_paste_chunk", lambda *a: pytest.fail("the batched products ran"))
    rng = np.random.default_rng(23)
    maps, boxes = _maps(rng, 30), _boxes(rng, 30, 96, 70)
    for values in (maps, maps.astype(np.float32) / 255.0):
        for threshold in (0.5, 0.3, 0.9):
            got = paste_masks_tensor(torch.from_numpy(values), torch.from_numpy(boxes), (96, 70), threshold)
            assert got.dtype == torch.bool and got.device.type == "cpu"
            assert torch.equal(got, paste_masks_reference(values, boxes, (96, 70), threshold))


def test_chunks_and_empty(monkeypatch):
    rng = np.random.default_rng(3)
    maps, boxes = _maps(rng, 25), _boxes(rng, 25, 50, 70)
    whole = _batched(maps, boxes, (50, 70))
    monkeypatch.setattr(paste_module, "_CHUNK_PIXELS", 3 * 50 * 70)  # 3 masks per chunk
    assert np.array_equal(_batched(maps, boxes, (50, 70)), whole)
    empty = _batched(np.zeros((0, M, M), np.uint8), np.zeros((0, 4), np.float32), (50, 70))
    assert empty.shape == (0, 50, 70) and empty.dtype == bool


def test_weights_are_torchs_up_to_1024():
    assert paste_module._taps_match_torch(M + 2, range(1, 1025))
    assert paste_module._taps_match_torch(16, range(1, 300))


def test_a_torch_build_with_other_weights_gets_the_loop(monkeypatch):
    monkeypatch.setattr(paste_module, "_VERIFIED", {})
    monkeypatch.setattr(paste_module, "_UNVERIFIED", set())
    monkeypatch.setattr(paste_module, "_taps_match_torch", lambda *a: False)
    monkeypatch.setattr(paste_module, "_paste_chunk", lambda *a: pytest.fail("the vectorised paste ran"))
    rng = np.random.default_rng(5)
    maps, boxes = _maps(rng, 10), _boxes(rng, 10, 40, 40)
    assert np.array_equal(_batched(maps, boxes, (40, 40)), paste_masks_reference(maps, boxes, (40, 40)).numpy())


def test_tensor_inputs_and_device():
    rng = np.random.default_rng(11)
    maps, boxes = _maps(rng, 12), _boxes(rng, 12, 60, 60)
    got = paste_masks_tensor(torch.from_numpy(maps), torch.from_numpy(boxes), (60, 60), device="cpu")
    assert got.device.type == "cpu" and got.dtype == torch.bool
    assert torch.equal(got, paste_masks_reference(maps, boxes, (60, 60)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paste_is_the_cpu_loop_bit_for_bit():
    rng = np.random.default_rng(13)
    for hw in [(128, 128), (480, 640)]:
        maps, boxes = _maps(rng, 60), _boxes(rng, 60, *hw)
        got = paste_masks_tensor(torch.from_numpy(maps).cuda(), torch.from_numpy(boxes).cuda(), hw, device="cuda")
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), paste_masks_reference(maps, boxes, hw))


@pytest.mark.parametrize("batched", [True, False])
def test_odd_boxes_and_empty_images(batched):
    """Boxes the detector does not make but torchvision pastes (inverted, under a pixel, wholly inside one
    pixel), a box whose float32 expansion rounds to another integer than float64's would, and images with no
    pixels."""
    maps = np.full((6, M, M), 255, dtype=np.uint8)
    maps[3:] = _maps(np.random.default_rng(29), 3)
    boxes = np.array(
        [
            [10, 10, 3, 3],
            [5, 5, 4.5, 4.5],
            [2.5, 575.5, 240.5, 739.75],
            [0, 0, 0, 0],
            [7.2, 7.3, 7.4, 7.9],
            [799, 799, 800, 800],
        ],
        dtype=np.float32,
    )
    for hw in [(800, 800), (20, 30)]:
        got = paste_masks_tensor(maps, boxes, hw, batched=batched)
        assert torch.equal(got, paste_masks_reference(maps, boxes, hw))
    for hw in [(0, 30), (30, 0)]:
        got = paste_masks_tensor(maps, boxes, hw, batched=batched)
        assert got.shape == (6, *hw) and torch.equal(got, paste_masks_reference(maps, boxes, hw))


def test_a_map_that_is_not_finite_is_left_to_torchvision():
    """A NaN or inf in a float map spreads NaN over the batched products; such a mask is decided by torchvision."""
    rng = np.random.default_rng(31)
    maps, boxes = _maps(rng, 8).astype(np.float32) / 255.0, _boxes(rng, 8, 50, 60)
    maps[2, 10, 10], maps[5, 3, 20] = np.nan, np.inf
    assert np.array_equal(_batched(maps, boxes, (50, 60)), paste_masks_reference(maps, boxes, (50, 60)).numpy())
