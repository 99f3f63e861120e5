"""Embedding head, triplet losses, negative sampling, training loop, save/load."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models import embedding, embedding_train
from pipeline.models.embedding import (
    EmbeddingHead,
    embed_features,
    hier_loss,
    load_head,
    mask_loss,
    object_loss,
    sample_object_negatives,
    save_head,
)
from pipeline.models.embedding_train import train_embedder

torch.set_num_threads(1)

LN3, LN9 = math.log(3.0), math.log(9.0)


def np_dist(x, y, c=1.0):
    """Closed-form Poincaré distance, by hand in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    num = 2 * c * ((x - y) ** 2).sum(-1)
    den = (1 - c * (x**2).sum(-1)) * (1 - c * (y**2).sum(-1))
    return np.arccosh(1 + num / den) / np.sqrt(c)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def ball_head(c=1.0):
    return EmbeddingHead(4, 8, 2, "poincare", c)


# --------------------------------------------------------------------------------------------- losses


def test_mask_loss_on_axis_points_by_hand():
    head = ball_head()
    # d(0, r e) = ln((1 + r) / (1 - r)): r = 0.5 -> ln 3, r = 0.8 -> ln 9.
    box = t([[0.0, 0.0], [0.0, 0.0]])
    fg = t([[0.5, 0.0], [0.0, 0.8]])
    bg = t([[0.0, 0.8], [0.5, 0.0]])
    got = mask_loss(box, fg, bg, head.distance, 0.2)
    # row 0: max(0, ln3 - ln9 + 0.2) = 0; row 1: ln9 - ln3 + 0.2 = ln3 + 0.2
    assert got.item() == pytest.approx((0.0 + LN3 + 0.2) / 2, rel=1e-9)


def test_object_loss_matches_closed_form():
    c = 0.7
    head = ball_head(c)
    a = [[0.1, 0.2], [0.0, -0.3], [0.4, 0.4]]
    p = [[0.15, 0.2], [0.5, 0.5], [0.41, 0.39]]
    n = [[-0.4, 0.1], [0.0, -0.25], [0.4, 0.45]]
    expected = np.maximum(0.0, np_dist(a, p, c) - np_dist(a, n, c) + 0.2).mean()
    got = object_loss(t(a), t(p), t(n), head.distance, 0.2)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # rows 1 and 2 have a positive hinge, row 0 is satisfied: the formula is not trivially zero
    assert expected > 0


def test_hier_loss_by_hand_and_closed_form():
    head = ball_head()
    parent = t([[0.5, 0.0], [0.0, 0.8]])
    child = t([[0.0, 0.8], [0.5, 0.0]])
    got = hier_loss(parent, child, head.norm_distance, 0.2)
    assert got.item() == pytest.approx((0.0 + LN3 + 0.2) / 2, rel=1e-9)

    c = 2.0
    head = ball_head(c)
    parent, child = [[0.3, -0.1], [0.1, 0.1]], [[0.2, 0.2], [0.5, -0.3]]
    d0 = lambda x: np_dist(x, np.zeros((2, 2)), c)  # noqa: E731
    expected = np.maximum(0.0, d0(parent) - d0(child) + 0.2).mean()
    assert hier_loss(t(parent), t(child), head.norm_distance, 0.2).item() == pytest.approx(expected, rel=1e-9)


def test_euclidean_losses_by_hand():
    head = EmbeddingHead(4, 8, 2, "euclidean", 1.0)
    a, p, n = t([[0.0, 0.0]]), t([[3.0, 4.0]]), t([[1.0, 0.0]])
    assert mask_loss(a, p, n, head.distance, 0.2).item() == pytest.approx(5 - 1 + 0.2)
    assert hier_loss(t([[3.0, 4.0]]), t([[0.0, 2.0]]), head.norm_distance, 0.2).item() == pytest.approx(3.2)


def test_empty_loss_is_zero_and_keeps_graph():
    head = ball_head()
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = object_loss(empty, empty, empty, head.distance, 0.2)
    assert loss.item() == 0.0 and loss.requires_grad


# ----------------------------------------------------------------------------------------------- head


@pytest.mark.parametrize("c", [1.0, 0.3, 4.0])
def test_head_outputs_strictly_inside_ball_for_huge_inputs(c):
    torch.manual_seed(0)
    head = EmbeddingHead(16, 32, 8, "poincare", c)
    x = torch.cat([torch.full((1, 16), 1e6), 1e6 * torch.randn(31, 16)]).float()
    z = head(x)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    sq = (z.double() ** 2).sum(-1)
    assert (c * sq < 1).all()
    assert torch.isfinite(head.norm_distance(z)).all()
    assert torch.isfinite(head.distance(z[:16], z[16:])).all()


def test_head_shapes_and_hidden_widths():
    assert len([m for m in EmbeddingHead(512, 256, 256).mlp if isinstance(m, torch.nn.Linear)]) == 3
    head = EmbeddingHead(512, [256], 256)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [256, 256]
    with pytest.raises(PipelineError, match="geometry"):
        EmbeddingHead(4, 8, 2, "lorentz")
    with pytest.raises(PipelineError, match="curvature"):
        EmbeddingHead(4, 8, 2, "poincare", 0.0)


# ------------------------------------------------------------------------------------------- sampling


def test_object_negatives_rules():
    offsets = np.array([0, 4, 8, 12])
    object_pairs = np.array([[0, 1], [2, 0], [4, 5]])
    keys = embedding.object_pair_keys(object_pairs, 12)
    batch = np.array([[0, 1]] * 300 + [[4, 5]] * 300)
    same = sample_object_negatives(batch, offsets, keys, torch.Generator().manual_seed(0), same_image_prob=1.0)
    assert set(same[:300]) == {3}  # 0, 1 are the pair, 2 overlaps the anchor
    assert set(same[300:]) == {6, 7}
    other = sample_object_negatives(batch, offsets, keys, torch.Generator().manual_seed(0), same_image_prob=0.0)
    assert set(other[:300]) == set(range(4, 12))
    assert set(other[300:]) == set(range(0, 4)) | set(range(8, 12))
    mixed = sample_object_negatives(batch, offsets, keys, torch.Generator().manual_seed(1))
    again = sample_object_negatives(batch, offsets, {(0, 1), (2, 0), (4, 5)}, torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(mixed, again)
    assert not np.isin(mixed[:300], [0, 1, 2]).any() and not np.isin(mixed[300:], [4, 5]).any()


def test_object_negatives_none_available():
    offsets = np.array([0, 3])
    neg = sample_object_negatives(np.array([[0, 1]]), offsets, {(0, 1), (0, 2)}, torch.Generator().manual_seed(0))
    assert neg.tolist() == [-1]
    # the same image's only candidate overlaps, but another image exists: fall back to it
    offsets = np.array([0, 3, 5])
    neg = sample_object_negatives(
        np.array([[0, 1]] * 50), offsets, {(0, 1), (0, 2)}, torch.Generator().manual_seed(0), same_image_prob=1.0
    )
    assert set(neg) == {3, 4}


# ------------------------------------------------------------------------------------------- training


def synthetic(n_images=20, per_image=10, d=32, seed=0, noise=0.6):
    """Proposals in pairs of one object (box = prototype + noise); fg = box + noise; bg = box + noise + a
    shift shared by all backgrounds (so the mask term is learnable but not satisfied at initialisation)."""
    rng = np.random.default_rng(seed)
    n = n_images * per_image
    protos = rng.normal(size=(n // 2, d))
    box = (np.repeat(protos, 2, axis=0) + noise * rng.normal(size=(n, d))).astype(np.float32)
    fg = (box + noise * rng.normal(size=(n, d))).astype(np.float32)
    bg = (box + noise * rng.normal(size=(n, d)) + 0.5 * rng.normal(size=d)).astype(np.float32)
    offsets = np.arange(0, n + 1, per_image, dtype=np.int64)
    object_pairs = np.stack([np.arange(0, n, 2), np.arange(1, n, 2)], 1).astype(np.int64)
    starts = offsets[:-1]
    hier = np.concatenate([np.stack([starts + p, starts + ch], 1) for p, ch in ((0, 2), (0, 4), (6, 8))])
    return {"box": box, "fg": fg, "bg": bg}, offsets, object_pairs, hier.astype(np.int64)


def train(data=None, **kw):
    features, offsets, object_pairs, hier = data or synthetic()
    args = dict(
        hidden=32,
        dim=8,
        geometry="poincare",
        c=1.0,
        margin=0.2,
        weights={"mask": 1.0, "object": 1.0, "hier": 1.0},
        lr=3e-3,
        epochs=3,
        batch_size=64,
        seed=0,
        device="cpu",
        progress=False,
    )
    args.update(kw)
    return train_embedder(features, offsets, object_pairs, hier, **args)


def test_training_lowers_each_active_loss():
    logged = []
    head, history = train(epochs=12, log=lambda e, m: logged.append((e, m)))
    assert len(history) == 12 and [e for e, _ in logged] == list(range(12))
    first, last = history[0], history[-1]
    for term in ("mask", "object", "hier", "total"):
        assert first[term] > 0.05 and last[term] < 0.5 * first[term], (term, first[term], last[term])
    assert last["d0_parent"] < last["d0_child"]
    assert last["lr"] < 1e-3  # cosine schedule decayed towards 0
    emb = embed_features(head, synthetic()[0]["box"], batch_size=50, device="cpu")
    assert emb.dtype == np.float32 and emb.shape == (200, 8)
    assert ((emb.astype(np.float64) ** 2).sum(1) < 1).all()


def test_training_is_deterministic():
    box = synthetic()[0]["box"]
    head1, hist1 = train(seed=3)
    head2, hist2 = train(seed=3)
    head3, _ = train(seed=4)
    e1, e2, e3 = (embed_features(h, box) for h in (head1, head2, head3))
    np.testing.assert_array_equal(e1, e2)
    assert not np.array_equal(e1, e3)
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(hist1) == drop(hist2)


@pytest.mark.parametrize("off", ["object", "hier", "mask"])
def test_zero_weight_skips_term_and_its_sampling(monkeypatch, off):
    calls = {"neg": 0, "hier": 0}
    real_neg, real_hier = embedding_train.sample_object_negatives, embedding_train.hier_hinges

    def spy_neg(*a, **k):
        calls["neg"] += 1
        return real_neg(*a, **k)

    def spy_hier(*a, **k):
        calls["hier"] += 1
        return real_hier(*a, **k)

    monkeypatch.setattr(embedding_train, "sample_object_negatives", spy_neg)
    monkeypatch.setattr(embedding_train, "hier_hinges", spy_hier)
    weights = {"mask": 1.0, "object": 1.0, "hier": 1.0, off: 0.0}
    features, offsets, object_pairs, hier = synthetic()
    if off == "mask":  # fg/bg are then not needed at all
        features = {"box": features["box"]}
    _, history = train((features, offsets, object_pairs, hier), weights=weights, epochs=1)
    assert off not in history[0]
    assert set(TERMS_ON := [k for k in ("mask", "object", "hier") if k != off]) <= set(history[0])
    assert (calls["neg"] == 0) == (off == "object")
    assert (calls["hier"] == 0) == (off == "hier")
    assert history[0]["total"] == pytest.approx(sum(history[0][k] for k in TERMS_ON))


def test_missing_pairs_warn_once_and_contribute_zero():
    features, offsets, _, hier = synthetic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, history = train((features, offsets, np.zeros((0, 2), np.int64), hier), epochs=2)
    msgs = [str(w.message) for w in caught if "no object pairs" in str(w.message)]
    assert len(msgs) == 1
    for h in history:
        assert h["object"] == 0.0
        assert h["total"] == pytest.approx(h["mask"] + h["hier"])


def test_nan_features_name_the_term():
    features, offsets, object_pairs, hier = synthetic()
    bad = dict(features, bg=features["bg"].copy())
    bad["bg"][5] = np.nan
    with pytest.raises(PipelineError, match=r"mask loss is nan at step 0"):
        train((bad, offsets, object_pairs, hier), batch_size=200)
    bad = dict(features, box=features["box"].copy())
    bad["box"][1] = np.nan  # row 1 is only in an object pair (as the positive), never in a hier pair
    with pytest.raises(PipelineError, match=r"object loss is nan at step 0"):
        train((bad, offsets, object_pairs, hier), batch_size=200, weights={"mask": 0.0, "object": 1.0, "hier": 1.0})


def test_euclidean_geometry_trains():
    head, history = train(geometry="euclidean", epochs=8)
    assert history[-1]["total"] < 0.5 * history[0]["total"]
    emb = embed_features(head, synthetic()[0]["box"])
    assert np.isfinite(emb).all()


def test_bad_inputs_are_one_line_errors():
    features, offsets, object_pairs, hier = synthetic()
    with pytest.raises(PipelineError, match="weights"):
        train(weights={"mask": 1.0, "object": 1.0})
    with pytest.raises(PipelineError, match="every loss weight is 0"):
        train(weights={"mask": 0.0, "object": 0.0, "hier": 0.0})
    with pytest.raises(PipelineError, match="image_offsets"):
        train((features, offsets[:-1], object_pairs, hier))
    with pytest.raises(PipelineError, match="hier pairs"):
        train((features, offsets, object_pairs, hier + 1000))
    with pytest.raises(PipelineError, match="fg"):
        train(({"box": features["box"]}, offsets, object_pairs, hier))


# ------------------------------------------------------------------------------------------ save/load


def test_save_load_roundtrip(tmp_path):
    head = EmbeddingHead(32, [16], 4, "poincare", 0.5)
    path = save_head(head, tmp_path / "models" / "embedder.pt", {"epochs": np.int64(3), "loss": np.float32(0.5)})
    assert [p.name for p in path.parent.iterdir()] == ["embedder.pt"]  # no tmp file left
    again = save_head(head, tmp_path / "other.pt", {"epochs": np.int64(3), "loss": np.float32(0.5)})
    assert again.read_bytes() == path.read_bytes()  # byte-identical whatever the file name
    loaded = load_head(path)
    assert loaded.config == head.config and loaded.meta == {"epochs": 3, "loss": 0.5}
    x = np.random.default_rng(0).normal(size=(10, 32)).astype(np.float32)
    np.testing.assert_array_equal(embed_features(head, x), embed_features(loaded, x))
    with pytest.raises(PipelineError, match="expects"):
        embed_features(loaded, x[:, :8])


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(PipelineError, match="nope.pt.*not found"):
        load_head(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="garbage.pt"):
        load_head(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(PipelineError, match="other.pt.*format"):
        load_head(other)
    wrong = tmp_path / "wrong.pt"
    save_head(EmbeddingHead(8, 4, 2), wrong)
    payload = torch.load(wrong, weights_only=True)
    payload["config"]["dim"] = 3
    torch.save(payload, wrong)
    with pytest.raises(PipelineError, match="wrong.pt.*incompatible"):
        load_head(wrong)


def test_embed_batches_streams_rows_in_order_and_reports_nan_after_the_last_batch():
    head = EmbeddingHead(4, 8, 2)
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float16)  # a float16 store's rows
    batches = list(embedding.embed_batches(head, x, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2] and all(b.dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), embed_features(head, x.astype(np.float32), batch_size=4))
    bad = x.astype(np.float32)
    bad[[5, 9]] = np.nan
    stream = embedding.embed_batches(head, bad, batch_size=4)
    assert [len(next(stream)) for _ in range(3)] == [4, 4, 2]  # every row comes out before the check
    with pytest.raises(PipelineError, match=r"2 of 10 embeddings are NaN/inf \(first row 5\)"):
        next(stream)
    with pytest.raises(PipelineError, match="expects"):
        embedding.embed_batches(head, x[:, :3])  # shape errors at the call, not at the first batch


# ------------------------------------------------------------------ released choices: view, init, schedule


def test_released_init_starts_every_embedding_at_the_origin():
    head = EmbeddingHead(64, hidden=32, dim=8, init="released")
    for layer in head.mlp:
        if isinstance(layer, torch.nn.Linear):
            assert layer.weight.abs().max() <= 1e-4
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    z = head(torch.randn(16, 64))
    assert head.norm_distance(z).max() < 1e-5
    with pytest.raises(PipelineError, match="init"):
        EmbeddingHead(64, init="xavier")


def test_released_init_makes_every_triplet_active_at_first():
    """At the origin every hinge is the margin: the first epoch's active shares are about 1 (and logged)."""
    _, history = train(init="released", epochs=2, lr=1e-5)
    for term in ("mask", "object", "hier"):
        assert history[0][f"active/{term}"] > 0.99
    _, default = train(epochs=2)
    for h in default:
        assert all(0.0 <= h[f"active/{t}"] <= 1.0 for t in ("mask", "object", "hier"))


def test_view_chooses_the_features_of_the_object_and_hier_terms_and_the_d0_statistics():
    """Without the mask term only the chosen view is read: with view fg the box features do not matter."""
    features, offsets, object_pairs, hier = synthetic()
    weights = {"mask": 0.0, "object": 1.0, "hier": 1.0}
    fg_only, hist_fg = train(({"fg": features["fg"]}, offsets, object_pairs, hier), weights=weights, view="fg")
    swapped, hist_swapped = train(({"box": features["fg"]}, offsets, object_pairs, hier), weights=weights, view="box")
    for a, b in zip(fg_only.state_dict().values(), swapped.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    drop = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
    assert drop(hist_fg) == drop(hist_swapped)
    with pytest.raises(PipelineError, match="box"):
        train(({"fg": features["fg"]}, offsets, object_pairs, hier), weights=weights, view="box")
    with pytest.raises(PipelineError, match="view"):
        train(view="bg")


def test_constant_schedule_keeps_the_learning_rate():
    _, constant = train(schedule="constant", lr=3e-3)
    assert [h["lr"] for h in constant] == [3e-3] * len(constant)
    _, cosine = train(lr=3e-3)
    assert cosine[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(PipelineError, match="schedule"):
        train(schedule="step")


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
def test_half_margin_is_the_same_margin_at_the_origin(c):
    """Same MLP weights: the ball head's distance to the origin is exactly twice the Euclidean head's, and
    pairwise distances near the origin tend to twice the Euclidean ones; hence the Euclidean margin / 2."""
    ball = EmbeddingHead(16, hidden=8, dim=4, geometry="poincare", c=c)
    flat = EmbeddingHead(16, hidden=8, dim=4, geometry="euclidean")
    flat.load_state_dict(ball.state_dict())
    x = torch.randn(64, 16, dtype=torch.float64)
    ball.double(), flat.double()
    torch.testing.assert_close(ball.norm_distance(ball(x)), 2 * flat.norm_distance(flat(x)))
    near = EmbeddingHead(16, hidden=8, dim=4, geometry="poincare", c=c, init="released").double()  # at the origin
    near_flat = EmbeddingHead(16, hidden=8, dim=4, geometry="euclidean").double()
    near_flat.load_state_dict(near.state_dict())
    ratio = near.distance(near(x[:32]), near(x[32:])) / near_flat.distance(near_flat(x[:32]), near_flat(x[32:]))
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2.0), rtol=1e-6, atol=0)
    assert embedding.geometry_margin(0.2, "euclidean") == pytest.approx(0.1)
    assert embedding.geometry_margin(0.2, "poincare") == 0.2
    assert embedding.geometry_margin(0.2, "euclidean", "same") == 0.2
    with pytest.raises(PipelineError, match="margin rule"):
        embedding.geometry_margin(0.2, "euclidean", "double")
