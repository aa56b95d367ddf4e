"""The click refiner of object tasks: window geometry, wiring, files, and that it learns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage

from napari_revolver.core.click_training import (
    ClickTrainConfig,
    click_episode,
    refiner_loss,
    synthetic_sources,
    train_refiner,
    unreliable_probability,
    validate,
)
from napari_revolver.core.model.click_refiner import (
    ClickRefiner,
    RefinerConfig,
    Window,
    click_maps,
    crop_to,
    deepened,
    paste_logits,
    sample_window,
    stack_inputs,
    window_around,
)
from napari_revolver.core.objects import (
    reaches_edge,
    refine_once,
    refined_mask,
    refined_masks,
    refiner_inputs,
    select_object,
)
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.weights import (
    ENCODER_OF,
    default_refiner_path,
    encoder_sources,
    encoder_state_equal,
    in_memory_weights,
    load_refiner,
    load_weights,
    save_refiner,
    save_weights,
)


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ------------------------------------------------------------------------- geometry
def test_window_holds_the_selection_and_the_clicks_with_context() -> None:
    mask = np.zeros((100, 120), bool)
    mask[40:50, 30:60] = True
    w = window_around(mask, np.array([[70.0, 45.0]]), context=1.5, min_side=10)
    assert w.side == pytest.approx(1.5 * 31)  # rows 40..70 are the longer side
    ys, xs = w.pixel_bounds(mask.shape)
    assert ys.start <= 40 and ys.stop >= 71 and xs.start <= 30 and xs.stop >= 60
    tiny = window_around(np.zeros((100, 120), bool), np.array([[5.0, 5.0]]), min_side=24)
    assert tiny.side == 24 and tiny.y0 == pytest.approx(5.5 - 12)


def test_sampling_follows_the_window_pixel_convention() -> None:
    # A map of each pixel's own y coordinate, sampled at window pixel (i, j), gives the slice
    # position the Window docstring promises.
    h, w = 60, 80
    ycoord = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)[None]
    win = Window(10.0, 20.0, 30.0)
    s = sample_window(ycoord, win, 15)[0]
    expect = 10.0 + (np.arange(15) + 0.5) * 30 / 15 - 0.5
    np.testing.assert_allclose(s[:, 0].numpy(), expect, atol=1e-4)
    # A map at stride 4 spanning 80 x 80 slice pixels samples the same positions.
    coarse = (torch.arange(20, dtype=torch.float32) * 4 + 1.5)[:, None].expand(20, 20)[None]
    s4 = sample_window(coarse, win, 15, (80.0, 80.0))[0]
    np.testing.assert_allclose(s4[:, 0].numpy(), expect, atol=1e-4)


def test_a_mask_sampled_into_its_window_and_pasted_back_is_itself() -> None:
    mask = _disc((90, 90), 40, 50, 12)
    win = window_around(mask, np.array([[40.0, 50.0]]))
    logits = sample_window(torch.from_numpy(mask.astype(np.float32))[None], win, 80)[0] - 0.5
    patch, (ys, xs) = paste_logits(logits, win, mask.shape)
    back = np.zeros_like(mask)
    back[ys, xs] = patch > 0
    assert (back & mask).sum() / (back | mask).sum() > 0.95


def test_click_maps_peak_at_the_clicks_by_polarity() -> None:
    win = Window(0.0, 0.0, 40.0)
    maps = click_maps(win, np.array([[10.0, 10.0], [30.0, 25.0]]), np.array([1, 0]), 40, (2.0,))
    assert maps.shape == (2, 40, 40)
    assert np.unravel_index(int(maps[0].argmax()), (40, 40)) == (10, 10)
    assert np.unravel_index(int(maps[1].argmax()), (40, 40)) == (30, 25)
    assert float(maps[0, 30, 25]) < 1e-6


def test_a_window_sampled_from_its_crop_is_the_window_sampled_from_the_slice() -> None:
    maps = torch.rand(2, 50, 70)
    for win in (Window(10.3, 20.7, 17.0), Window(-5.0, 60.0, 30.0), Window(40.0, -3.5, 12.0)):
        crop, local = crop_to(maps, win)
        assert crop.shape[-2] < 50 or crop.shape[-1] < 70
        whole = torch.nn.functional.grid_sample(  # the window's pixels on the whole maps
            maps[None],
            torch.stack(
                torch.meshgrid(
                    *(
                        ((o + (torch.arange(9) + 0.5) * win.side / 9) / n) * 2 - 1
                        for o, n in ((win.y0, 50), (win.x0, 70))
                    ),
                    indexing="ij",
                )[::-1],
                -1,
            )[None],
            align_corners=False,
        )[0]
        torch.testing.assert_close(sample_window(crop, local, 9), whole)


# --------------------------------------------------------------------------- wiring
def _slice_inputs(shape: tuple[int, int] = (64, 64)) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": torch.from_numpy(rng.normal(size=(3, *shape)).astype(np.float32)),
        "fine": torch.from_numpy(rng.normal(size=(32, shape[0] // 4, shape[1] // 4))).half(),
        "fine_stride": 4,
    }


def test_an_untrained_refiner_returns_the_selection() -> None:
    prob = (_disc((64, 64), 32, 18, 9) | _disc((64, 64), 32, 44, 9)).astype(np.float32)
    pts, lab = np.array([[32.0, 18.0]]), np.array([1])
    sel = select_object(prob, pts, lab)
    out = refined_mask(
        ClickRefiner().eval(), prob=prob, selection=sel, points=pts, labels=lab, **_slice_inputs()
    )
    assert (out == sel).mean() > 0.99


def test_a_deepened_refiner_computes_what_it_was_built_from() -> None:
    torch.manual_seed(0)
    base = ClickRefiner(RefinerConfig(size=32, width=8, mid_width=8, dilations=(1, 2)))
    with torch.no_grad():
        for param in base.parameters():
            param.normal_(0, 0.3)
    x = torch.randn(3, base.in_channels, 32, 32)
    for mode in (False, True):  # eval (running statistics) and training (batch statistics)
        base.train(mode)
        grown = deepened(base, (4, 8))
        assert grown.training is mode and grown.config.dilations == (1, 2, 4, 8)
        with torch.no_grad():
            torch.testing.assert_close(grown(x), base(x))
        # Only the new blocks are new: the old ones are the base's, and they train.
        assert len(grown.blocks) == 4
        assert torch.equal(grown.blocks[1].a[0].weight, base.blocks[1].a[0].weight)
    with torch.no_grad():
        grown.blocks[3].b[1].weight.fill_(1.0)
        assert not torch.allclose(grown(x), base(x))
    with pytest.raises(ValueError, match=r"at least 1; got \[4, 0\]"):
        deepened(base, (4, 0))


def test_refined_mask_keeps_only_parts_with_a_positive_click() -> None:
    refiner = ClickRefiner().eval()
    with torch.no_grad():
        refiner.out.bias.fill_(20.0)  # "everything in the window is the object"
    shape = (160, 160)
    prob = _disc(shape, 80, 80, 6).astype(np.float32) + _disc(shape, 80, 20, 6)
    pts, lab = np.array([[80.0, 80.0]]), np.array([1])
    sel = select_object(prob, pts, lab)
    inputs = _slice_inputs(shape)
    out = refined_mask(refiner, prob=prob, selection=sel, points=pts, labels=lab, **inputs)
    ys, xs = window_around(sel, pts).pixel_bounds(shape)
    assert out.sum() > sel.sum()
    assert out[ys, xs].all() and out.sum() == out[ys, xs].size  # the window, not beyond
    # A refiner with redraws: the mask fills its window, so it reaches the window's edge and
    # is redrawn in the window around it, config.regrow times; it is the last window.
    refiner.config = replace(refiner.config, regrow=2)
    grown = refined_mask(refiner, prob=prob, selection=sel, points=pts, labels=lab, **inputs)
    win = window_around(sel, pts)
    for _ in range(2):
        ys, xs = win.pixel_bounds(shape)
        box = np.zeros(shape, bool)
        box[ys, xs] = True
        win = window_around(box, pts)
    ys, xs = win.pixel_bounds(shape)
    assert grown[ys, xs].all() and grown.sum() == grown[ys, xs].size
    assert not grown[:, :40].any()  # the other disc's selection never joins
    once = refine_once(
        refiner,
        refiner_inputs(refiner, **inputs, prob=prob, selection=sel, points=pts, labels=lab),
        sel,
        pts,
        lab,
    )
    np.testing.assert_array_equal(once, out)


def test_a_mask_reaches_its_window_edge_only_inside_the_slice() -> None:
    win = Window(10.0, 10.0, 20.0)  # pixels 10..29
    mask = np.zeros((40, 40), bool)
    mask[15:25, 15:25] = True
    assert not reaches_edge(mask, win)
    mask[15:25, 15:30] = True  # to the window's right edge, inside the slice
    assert reaches_edge(mask, win)
    corner = Window(-5.0, -5.0, 20.0)  # clipped by the slice at the top and the left
    mask = np.zeros((40, 40), bool)
    mask[0:8, 0:8] = True
    assert not reaches_edge(mask, corner)
    mask[0:8, 0:15] = True
    assert reaches_edge(mask, corner)


def test_refined_masks_of_many_objects_are_each_one_refined_alone() -> None:
    torch.manual_seed(0)
    refiner = ClickRefiner().eval()
    with torch.no_grad():
        for prm in refiner.parameters():
            prm.normal_(0, 0.3)  # a refiner that changes the selections
    shape = (96, 96)
    centres = [(20, 20), (20, 70), (70, 30), (60, 70), (45, 45)]
    prob = np.zeros(shape, np.float32)
    for cy, cx in centres:
        prob = np.maximum(prob, _disc(shape, cy, cx, 8).astype(np.float32))
    items = []
    for cy, cx in centres:
        pts, lab = np.array([[cy, cx], [cy + 30.0, cx]]) % 96, np.array([1, 0])
        items.append((prob, select_object(prob, pts, lab), pts, lab))
    inputs = _slice_inputs(shape)
    alone = [
        refined_mask(refiner, **inputs, prob=p, selection=s, points=q, labels=lab)
        for p, s, q, lab in items
    ]
    together = refined_masks(refiner, *inputs.values(), iter(items))
    assert len(together) == len(alone)
    assert any((a != s).any() for a, (_, s, _, _) in zip(alone, items, strict=True))
    for a, b in zip(alone, together, strict=True):
        assert (a != b).sum() <= 2  # the same, up to a pixel at logit 0 in another batch


def test_predictor_object_clicks_go_through_its_refiner(predictor: RevolverPredictor) -> None:
    rng = np.random.default_rng(1)
    vol = rng.random((3, 64, 64)).astype(np.float32)
    vol[:, 24:40, 24:40] += 2.0
    predictor.set_volume(vol)
    task = predictor.guide([[1, 32, 32]], [1], kind="object")
    assert predictor.refiner is None  # in-memory test weights have none
    with pytest.raises(ValueError, match="feature channels"):
        predictor.refiner = ClickRefiner(RefinerConfig(feature_channels=999))
    channels = predictor.model.config.feature_fine_channels
    refiner = ClickRefiner(RefinerConfig(feature_channels=channels))
    with torch.no_grad():
        refiner.out.bias.fill_(20.0)
    predictor.refiner = refiner
    mask = predictor.predict_slice(1, task)
    win = window_around(np.zeros((64, 64), bool), np.array([[32, 32]]))
    assert mask.sum() >= 0.8 * win.side**2 or mask.all()


def test_a_negative_click_the_refiner_draws_over_is_cut_out(
    predictor: RevolverPredictor,
) -> None:
    rng = np.random.default_rng(1)
    predictor.set_volume(rng.random((3, 64, 64)).astype(np.float32))
    channels = predictor.model.config.feature_fine_channels
    refiner = ClickRefiner(RefinerConfig(feature_channels=channels))
    with torch.no_grad():
        refiner.out.bias.fill_(20.0)  # draws its whole window, whatever the clicks say
    predictor.refiner = refiner
    one = predictor.predict_slice(1, predictor.guide([[1, 32, 32]], [1], kind="object"))
    assert one[32, 44]
    task = predictor.guide([[1, 32, 32], [1, 32, 44]], [1, 0], kind="object")
    cut = predictor.predict_slice(1, task)
    assert cut[32, 32] and not cut[32, 44]
    assert cut[:, :38].sum() > 0.9 * one[:, :38].sum()  # the positive side is kept
    assert ndimage.label(cut)[1] == 1


# ---------------------------------------------------------------------------- files
def _tiny_weights(tiny_model: torch.nn.Module, tmp_path: Path) -> tuple[Path, str, int]:
    """Save the tiny model as weights: their file, sha256 and the refiners' feature channels."""
    weights = save_weights(tiny_model, tmp_path / "tiny.safetensors")
    return weights, load_weights(weights).sha256, tiny_model.config.feature_fine_channels


def test_refiner_files_round_trip_and_refuse_other_weights(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    weights, sha, channels = _tiny_weights(tiny_model, tmp_path)
    refiner = ClickRefiner(RefinerConfig(size=32, feature_channels=channels))
    with torch.no_grad():
        refiner.out.bias.fill_(0.25)
    path = save_refiner(refiner, tmp_path / "tiny-clicks.safetensors", {"base_sha256": sha})
    loaded = load_weights(weights)
    assert loaded.refiner is not None
    assert loaded.refiner.config.size == 32
    assert float(loaded.refiner.out.bias.detach()) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="trained on weights"):
        load_refiner(path, "0" * 64)
    (tmp_path / "tiny-clicks.json").write_text(json.dumps({"sha256": "1" * 64}))
    with pytest.raises(ValueError, match="corrupt"):
        load_refiner(path, sha)
    assert load_weights(weights).refiner is None  # a bad refiner is left out, with a warning


def test_a_corrections_refiner_beside_the_weights_is_loaded_and_used(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    weights, sha, channels = _tiny_weights(tiny_model, tmp_path)
    path = default_refiner_path(weights, "corrections")
    assert path.name == "tiny-corrections.safetensors"
    refiner = ClickRefiner(RefinerConfig(size=32, feature_channels=channels, previous_mask=True))
    save_refiner(refiner, path, {"base_sha256": sha, "role": "clicks"})
    loaded = load_weights(weights)
    assert loaded.corrector is not None and loaded.refiner is None
    assert loaded.corrector.config.previous_mask
    predictor = RevolverPredictor(loaded, device="cpu")
    assert predictor.corrector is not None
    # Without a click refiner nothing redraws: corrections are selected like first clicks.
    assert predictor._redrawer(correction=True) is None
    predictor.refiner = ClickRefiner(RefinerConfig(size=32, feature_channels=channels))
    assert predictor._redrawer(correction=True) is predictor.corrector
    assert predictor._redrawer(correction=False) is predictor.refiner
    predictor.corrector = None
    assert predictor._redrawer(correction=True) is predictor.refiner
    # A follower is no corrections refiner: left out, with a warning.
    save_refiner(refiner, path, {"base_sha256": sha, "role": "follow"})
    assert load_weights(weights).corrector is None


def test_a_refiner_of_the_same_encoder_is_kept_for_a_new_head(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    # A head trained on a frozen encoder, packaged with `encoder_of` naming the weights the
    # refiner was trained on, keeps that refiner; other weights still refuse it.
    old = save_weights(tiny_model, tmp_path / "old.safetensors")
    old_sha = load_weights(old).sha256
    refiner = ClickRefiner(RefinerConfig(size=32, feature_channels=tiny_model.config.fine_channels))
    with torch.no_grad():
        next(tiny_model.segmentor.parameters()).add_(0.5)  # a new head, the same encoder
    new = save_weights(tiny_model, tmp_path / "new.safetensors", extra={ENCODER_OF: old_sha})
    save_refiner(refiner, default_refiner_path(new), {"base_sha256": old_sha})
    assert encoder_state_equal(load_file(str(old)), load_file(str(new)))
    loaded = load_weights(new)
    assert encoder_sources(loaded.metadata) == (old_sha,)
    assert loaded.refiner is not None
    assert RevolverPredictor(loaded, device="cpu").refiner is not None
    other = save_weights(tiny_model, tmp_path / "other.safetensors")
    save_refiner(refiner, default_refiner_path(other), {"base_sha256": old_sha})
    assert load_weights(other).refiner is None  # no `encoder_of`: refused, with a warning
    with torch.no_grad():
        tiny_model.encoder.stem[0][0].weight.add_(0.1)
    save_weights(tiny_model, tmp_path / "moved.safetensors")
    assert not encoder_state_equal(
        load_file(str(old)), load_file(str(tmp_path / "moved.safetensors"))
    )


def test_a_refiner_of_the_learnt_channels_reads_them_alone(tiny_model: torch.nn.Module) -> None:
    # A network with a task fit appends filter responses to its fine features; a refiner
    # trained on the learnt channels reads just those.
    cfg = tiny_model.config
    assert cfg.feature_fine_channels > cfg.fine_channels
    fine = torch.randn(cfg.feature_fine_channels, 16, 16)
    image, prob = torch.randn(3, 64, 64), torch.rand(64, 64)
    sel, win = (prob > 0.5).float(), Window(8.0, 8.0, 40.0)
    pts, lab = np.array([[30.0, 30.0]]), np.array([1])
    short = RefinerConfig(size=24, feature_channels=cfg.fine_channels)
    x = stack_inputs(image, fine, 4, prob, sel, win, pts, lab, short)
    y = stack_inputs(image, fine[: cfg.fine_channels], 4, prob, sel, win, pts, lab, short)
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="feature channels"):
        RevolverPredictor(in_memory_weights(tiny_model), device="cpu").refiner = ClickRefiner(
            RefinerConfig(feature_channels=cfg.fine_channels + 1)
        )


def test_shipped_weights_and_refiner_belong_together() -> None:
    w = load_weights()
    if w.refiner is None:
        pytest.skip("no click refiner shipped beside the weights")
    c = w.model.config
    assert w.refiner.config.feature_channels in (c.fine_channels, c.feature_fine_channels)
    if w.corrector is not None:  # it corrects the mask shown, in the refiner's window
        assert w.corrector.config.previous_mask
        assert w.corrector.config.feature_channels == w.refiner.config.feature_channels
        assert w.corrector.config.size == w.refiner.config.size


# ---------------------------------------------------------------------------- learning
def test_an_unreliable_probability_breaks_the_object_up_or_leaks() -> None:
    prob = _disc((96, 96), 48, 48, 16).astype(np.float32)
    inside, outside = [], []
    for seed in range(12):
        q = unreliable_probability(prob, 16.0, np.random.default_rng(seed))
        assert q.shape == prob.shape and q.dtype == np.float32
        assert q.min() >= 0 and q.max() <= 1
        np.testing.assert_array_equal(
            q, unreliable_probability(prob, 16.0, np.random.default_rng(seed))
        )
        inside.append(float(q[prob > 0].mean()))
        outside.append(float(q[prob == 0].mean()))
    # Some draws break the object up (and leave its surroundings), others add false foreground.
    assert min(inside) < 0.7 and max(outside) > 0.2
    assert any(i < 0.9 and o == 0 for i, o in zip(inside, outside, strict=True))
    assert any(i == 1 and o > 0.1 for i, o in zip(inside, outside, strict=True))


def test_click_episodes_sample_every_redraw_and_spoil_the_probability() -> None:
    [src, *_] = synthetic_sources(load_weights(), 2, 0, side=256)
    z, oid = min(src.objects, key=lambda o: (src.labels[o[0]] == o[1]).sum())
    for regrow in (0, 2):
        refiner = ClickRefiner(RefinerConfig(size=32, width=8, mid_width=8, regrow=regrow))
        with torch.no_grad():
            refiner.out.bias.fill_(20.0)  # draws its whole window: every mask reaches the edge
        samples = click_episode(refiner.eval(), src, z, oid, 0, None)
        assert len(samples) == 1 + regrow  # the click's window, then each redraw's
        assert all(x.shape == (refiner.in_channels, 32, 32) for x, _ in samples)
    # A spoiled episode reads another probability (its channel in the first window).
    plain = click_episode(refiner, src, z, oid, 0, np.random.default_rng(3))[0][0]
    spoiled = click_episode(refiner, src, z, oid, 0, np.random.default_rng(3), p_unreliable=1.0)
    assert not torch.equal(plain, spoiled[0][0])


def test_click_episodes_read_the_mask_shown_at_corrections() -> None:
    [src, *_] = synthetic_sources(load_weights(), 2, 0, side=256)
    z, oid = min(src.objects, key=lambda o: (src.labels[o[0]] == o[1]).sum())
    read = {}
    for previous in (False, True):
        cfg = RefinerConfig(size=32, width=8, mid_width=8, previous_mask=previous)
        refiner = ClickRefiner(cfg)
        with torch.no_grad():
            refiner.out.bias.fill_(20.0)  # draws its whole window, far beyond the object
        samples = click_episode(refiner.eval(), src, z, oid, 1, None)
        assert len(samples) == 2  # the first click, then one correction
        channel = cfg.image_channels + cfg.feature_channels + 1  # the selection's
        read[previous] = [float(x[channel].mean()) for x, _ in samples]
    # The first click reads the selection either way. The correction reads the selection
    # (about the object) or the mask shown after the first click (the whole first window,
    # cut by the negative click): much more of its window.
    assert read[False][0] == read[True][0]
    assert read[True][1] > read[False][1] + 0.1


def test_episodes_of_first_clicks_only() -> None:
    from napari_revolver.core.click_training import _corrections

    rng = np.random.default_rng(0)
    assert {_corrections(rng, 0) for _ in range(20)} == {0}
    assert max(_corrections(rng, 3) for _ in range(40)) == 3
    with pytest.raises(ValueError, match="max_corrections must be 0 or more"):
        ClickTrainConfig(max_corrections=-1)
    with pytest.raises(ValueError, match="not both"):
        ClickTrainConfig(first_refiner="a.safetensors", corrector="b.safetensors")
    with pytest.raises(ValueError, match="val_clicks must be 5 or more; got 3"):
        ClickTrainConfig(val_clicks=3)


def test_click_episodes_of_a_corrector_sample_the_corrections_only() -> None:
    [src, *_] = synthetic_sources(load_weights(), 2, 0, side=256)
    z, oid = min(src.objects, key=lambda o: (src.labels[o[0]] == o[1]).sum())
    cfg = RefinerConfig(size=32, width=8, mid_width=8, previous_mask=True)
    first, corrector = ClickRefiner(cfg).eval(), ClickRefiner(cfg).eval()
    with torch.no_grad():
        first.out.bias.fill_(20.0)  # draws its whole window, far beyond the object
    alone = click_episode(corrector, src, z, oid, 1, None)
    samples = click_episode(corrector, src, z, oid, 1, None, first=first)
    assert len(alone) == 2 and len(samples) == 1  # the correction's window only
    # The correction reads the mask the first refiner drew: its whole window, cut.
    channel = cfg.image_channels + cfg.feature_channels + 1  # the selection's
    assert float(samples[0][0][channel].mean()) > float(alone[1][0][channel].mean()) + 0.1
    # Validation scores the first click by the first refiner.
    item = [(src, z, oid)]
    assert validate(corrector, item, first=first)["iou@1"] != validate(corrector, item)["iou@1"]
    # Longer validation scores late corrections too, the first five clicks as before.
    five, longer = validate(corrector, item), validate(corrector, item, 12)
    assert list(five) == ["iou@1", "iou@3", "iou@5"]
    assert list(longer) == ["iou@1", "iou@3", "iou@5", "iou@10", "iou@12"]
    assert all(longer[k] == five[k] for k in five)
    assert list(validate(corrector, item, 7)) == ["iou@1", "iou@3", "iou@5", "iou@7"]


def _merged_pair(rng: np.random.Generator, shape: tuple[int, int] = (64, 64)) -> tuple:
    """Two touching look-alike discs that the selection cannot split, and a negative click."""
    r = rng.uniform(7, 10)
    cy, cx = rng.uniform(24, 40), rng.uniform(20, 26)
    a, b = _disc(shape, cy, cx, r), _disc(shape, cy, cx + 1.6 * r, r)
    prob = (a | b).astype(np.float32)
    pts = np.array([[cy, cx], [cy, cx + 1.6 * r]])
    lab = np.array([1, 0])
    return prob, a, pts, lab


def test_refiner_learns_what_a_negative_click_on_a_merged_neighbour_means() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = RefinerConfig(size=40, feature_channels=4, width=12, mid_width=16, dilations=(1, 2))
    refiner = ClickRefiner(cfg)
    base = _slice_inputs()

    def example(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        prob, truth, pts, lab = _merged_pair(rng)
        sel = prob > 0.5  # the selection keeps both (what a plain threshold would do)
        win = window_around(sel, pts, context=cfg.context, min_side=cfg.min_side)
        x = stack_inputs(
            base["image"],
            base["fine"][:4],
            base["fine_stride"],
            torch.from_numpy(prob),
            torch.from_numpy(sel),
            win,
            pts,
            lab,
            cfg,
        )
        y = sample_window(torch.from_numpy(truth.astype(np.float32))[None], win, cfg.size)[0]
        return x, y, (prob, truth, pts, lab, sel)

    def score() -> float:
        refiner.eval()
        ious = []
        for _, _, (prob, truth, pts, lab, sel) in (
            example(np.random.default_rng(100 + i)) for i in range(6)
        ):
            out = refined_mask(
                refiner, base["image"], base["fine"][:4], base["fine_stride"], prob, sel, pts, lab
            )
            ious.append((out & truth).sum() / (out | truth).sum())
        return float(np.mean(ious))

    before = score()
    opt = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    for _ in range(60):
        refiner.train()
        batch = [example(rng) for _ in range(8)]
        loss = refiner_loss(
            refiner(torch.stack([b[0] for b in batch])), torch.stack([b[1] for b in batch])
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = score()
    assert before < 0.6  # the selection holds both discs
    assert after > before + 0.2


def test_training_runs_checkpoints_and_resumes(tmp_path: Path) -> None:
    cfg = ClickTrainConfig(
        out=str(tmp_path / "run"),
        steps=2,
        batch=4,
        synthetic=3,
        val_every=2,
        val_objects=2,
        max_corrections=2,
        p_unreliable=0.5,
        regrow=1,
        previous_mask=True,
        refiner=RefinerConfig(size=32, width=8, mid_width=8, dilations=(1,)),
    )
    best = train_refiner(cfg)
    assert best.exists() and (tmp_path / "run" / "checkpoint.pt").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "selection" in log[0]
    assert log[-1]["step"] == 2 and "val" in log[-1]
    cfg.steps = 3
    train_refiner(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "val" in r] == [2, 3]  # resumed, not restarted
    assert load_refiner(best).config.size == 32 and load_refiner(best).config.regrow == 1
    assert load_refiner(best).config.previous_mask


def test_training_starts_from_an_init_refiner_and_keeps_it_unless_beaten(tmp_path: Path) -> None:
    small = RefinerConfig(size=32, width=8, mid_width=8, dilations=(1,))
    first = ClickTrainConfig(
        out=str(tmp_path / "a"), steps=2, batch=4, synthetic=3, val_every=2, val_objects=2,
        max_corrections=2, refiner=small,
    )  # fmt: skip
    start = train_refiner(first)
    # Another architecture by default: the init's replaces it. No learning rate: nothing moves,
    # so the best is the init itself, saved at step 0 with its validation.
    cfg = ClickTrainConfig(
        out=str(tmp_path / "b"), steps=2, batch=4, synthetic=3, val_every=2, val_objects=2,
        max_corrections=2, lr=0.0, init=str(start),
    )  # fmt: skip
    best = train_refiner(cfg)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "selection" in log[0] and "val" in log[0]
    assert log[-1]["val"] == log[0]["val"]
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["refiner"]["size"] == 32 and saved["init"] == str(start)
    a, b = load_file(str(start)), load_file(str(best))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("bn" in k or "running_mean" in k for k in a)  # trainable layout, not folded


def test_a_refiner_of_another_role_is_refused_as_init(tmp_path: Path) -> None:
    path = save_refiner(
        ClickRefiner(RefinerConfig(size=32)), tmp_path / "f.safetensors", {"role": "follow"}
    )
    assert load_refiner(path, role="follow") is not None
    with pytest.raises(ValueError, match="'follow' refiner; expected a 'clicks'"):
        load_refiner(path, role="clicks")
    cfg = ClickTrainConfig(out=str(tmp_path / "run"), steps=1, synthetic=2, init=str(path))
    with pytest.raises(ValueError, match="expected a 'clicks'"):
        train_refiner(cfg)


def test_train_clicks_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from napari_revolver.cli import main

    run = tmp_path / "run"
    args = ["train-clicks", "--out", str(run), "--steps", "1", "--batch", "2"]
    args += ["--synthetic", "2", "--val-every", "1", "--val-objects", "1", "--max-corrections", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"best refiner: {run / 'best.safetensors'}" in out
    assert load_refiner(run / "best.safetensors", load_weights().sha256) is not None
    with pytest.raises(SystemExit):
        main(["train-clicks"])  # --out is required
    capsys.readouterr()
    assert main([*args, "--init", str(tmp_path / "missing.safetensors")]) != 0
    err = capsys.readouterr().err
    assert "--init " in err and "missing.safetensors does not exist" in err
    # Fine-tuning the refiner just trained, on one thread: it starts from its weights.
    again = ["train-clicks", "--out", str(tmp_path / "ft"), "--steps", "1", "--batch", "2"]
    again += ["--synthetic", "2", "--val-every", "1", "--val-objects", "1", "--threads", "1"]
    again += ["--p-unreliable", "0.5", "--regrow", "2", "--add-dilations", "8,16"]
    again += ["--previous-mask"]
    assert main([*again, "--init", str(run / "best.safetensors")]) == 0
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["init"] == str(run / "best.safetensors") and cfg["threads"] == 1
    assert cfg["p_unreliable"] == 0.5 and cfg["refiner"]["regrow"] == 2
    assert cfg["previous_mask"] and cfg["refiner"]["previous_mask"]
    start = load_refiner(run / "best.safetensors").config.dilations
    assert tuple(cfg["refiner"]["dilations"]) == (*start, 8, 16)
    tuned = load_refiner(tmp_path / "ft" / "best.safetensors").config
    assert tuned.regrow == 2 and tuned.dilations == (*start, 8, 16) and tuned.previous_mask
    assert not load_refiner(run / "best.safetensors").config.previous_mask  # off by default
    # A refiner of corrections, its episodes' first clicks drawn by the one just trained.
    corr = ["train-clicks", "--out", str(tmp_path / "corr"), "--steps", "1", "--batch", "2"]
    corr += ["--synthetic", "2", "--val-every", "1", "--val-objects", "1", "--previous-mask"]
    assert main([*corr, "--first-refiner", str(run / "best.safetensors"), "--val-clicks", "6"]) == 0
    cap = capsys.readouterr()
    assert "revolver-s-corrections.safetensors" in cap.out
    assert "validation IoU after 1/3/5/6 clicks" in cap.err
    cfg = json.loads((tmp_path / "corr" / "config.json").read_text())
    assert cfg["first_refiner"] == str(run / "best.safetensors") and cfg["val_clicks"] == 6
    assert main([*corr, "--first-refiner", str(tmp_path / "missing.safetensors")]) != 0
    assert "--first-refiner " in capsys.readouterr().err
    # A refiner of first clicks, validated with the corrector just trained.
    first = ["train-clicks", "--out", str(tmp_path / "first"), "--steps", "1", "--batch", "2"]
    first += ["--synthetic", "2", "--val-every", "1", "--val-objects", "1"]
    assert main([*first, "--corrector", str(tmp_path / "corr" / "best.safetensors")]) == 0
    assert "revolver-s-clicks.safetensors" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "first" / "config.json").read_text())
    assert cfg["corrector"] == str(tmp_path / "corr" / "best.safetensors")
    both = [*first, "--corrector", str(run / "best.safetensors")]
    assert main([*both, "--first-refiner", str(run / "best.safetensors")]) != 0
    assert "give --first-refiner (train corrections) or --corrector" in capsys.readouterr().err
    for bad in ("0", "8,x", ""):
        with pytest.raises(SystemExit):
            main([*args, "--add-dilations", bad])
        assert "expected comma-separated whole numbers of at least 1" in capsys.readouterr().err
    assert main([*args, "--p-unreliable", "1.5"]) != 0
    assert "--p-unreliable must be in [0, 1]; got 1.5" in capsys.readouterr().err
    assert main([*args, "--max-corrections", "-1"]) != 0
    assert "--max-corrections must be 0 or more; got -1" in capsys.readouterr().err
    assert main([*args, "--val-clicks", "2"]) != 0
    assert "--val-clicks must be 5 or more; got 2" in capsys.readouterr().err
