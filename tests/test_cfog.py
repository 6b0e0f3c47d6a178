"""CFOG fine alignment: the hand-made descriptor finds a SAR-like patch on an optical map, and
the refiner uses it without a trained checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from cmpc.config import RefineConfig
from cmpc.errors import CheckpointError
from cmpc.localize.align import LazyFeatureMosaic, align_to_mosaic, build_feature_mosaic
from cmpc.localize.localizer import load_refiner
from cmpc.localize.refine import cfog_refiner
from cmpc.models.cfog import CfogDescriptor
from cmpc.models.descriptor import DenseDescriptor


def _blocks(seed: int, size: int) -> np.ndarray:
    """A (3, size, size) optical-like map of flat blocks (fields, roofs) with soft edges."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    for _ in range(260):
        r, c = rng.integers(0, size, 2)
        h, w = rng.integers(4, 30, 2)
        img[r : r + h, c : c + w] = rng.uniform(0, 1)
    img = ndi.gaussian_filter(img, 0.7)
    rgb = np.stack([img, 0.8 * img + 0.1, 0.6 * img + 0.2])
    return ((rgb - rgb.mean((1, 2), keepdims=True)) / rgb.std((1, 2), keepdims=True)).astype(np.float32)


def _sar_like(opt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One band: brightness inverted and squared (no linear relation to the optical), times
    4-look gamma speckle."""
    g = opt.mean(0)
    g = (g - g.min()) / (g.max() - g.min())
    amp = (1.05 - g) ** 2 * rng.gamma(4.0, 0.25, size=g.shape)
    return ((amp - amp.mean()) / amp.std())[None].astype(np.float32)


@torch.no_grad()
def test_cfog_finds_a_speckled_contrast_inverted_patch_where_intensities_fail():
    img = _blocks(0, 320)
    ox, oy, gsd, S = 1000.0, 5000.0, 8.0, 96
    cfog = CfogDescriptor(1, 3, sigma=0.8, sar_sigma=1.0)
    fm = build_feature_mosaic(cfog, img, np.ones(img.shape[1:], bool), ox, oy, gsd, tile_px=128, margin_px=32, lazy_bytes=0)
    assert isinstance(fm, LazyFeatureMosaic) and fm.stride == 1 and fm.dim == 9
    # small maps are described once and stored: the same windows
    stored = build_feature_mosaic(cfog, img, np.ones(img.shape[1:], bool), ox, oy, gsd, tile_px=128, margin_px=32)
    assert not isinstance(stored, LazyFeatureMosaic) and stored.desc.shape == (9, 320, 320)
    t, lf = torch.tensor([[50, 200]]), torch.tensor([[70, 10]])
    d = (stored.crops(t, lf, 40, 60) - fm.crops(t, lf, 40, 60)).abs()  # (the lazy map is float16)
    assert d.mean() < 2e-3 and d.max() < 0.05
    # a lazy window holds exactly the descriptors of the whole map at that place (interior)
    # (the map is kept in float16: compare with the descriptors of the rounded band mean)
    whole = cfog(torch.from_numpy(img.mean(0)).half().float()[None, None], "opt")[0]
    win = fm.crops(torch.tensor([[50, 200]]), torch.tensor([[70, 10]]), 40, 60)
    assert win.shape == (1, 2, 9, 40, 60)
    assert torch.allclose(win[0, 0], whole[:, 50:90, 70:130], atol=5e-3)
    assert torch.allclose(win[0, 1], whole[:, 200:240, 10:70], atol=5e-3)
    rng = np.random.default_rng(1)
    tl = rng.integers(40, 320 - S - 40, size=(12, 2))
    q = torch.stack([torch.from_numpy(_sar_like(img[:, r : r + S, c : c + S], rng)) for r, c in tl])
    true = np.stack([ox + (tl[:, 1] + S / 2) * gsd, oy - (tl[:, 0] + S / 2) * gsd], 1)
    centres = true + rng.uniform(-30, 30, size=true.shape) * gsd
    for m in (fm, stored):
        for score in ("corr", "zncc"):
            res = align_to_mosaic(cfog(q, "sar"), m, torch.from_numpy(centres)[:, None], S, max_shift_px=36, score=score)
            err_px = np.linalg.norm(res.position_m[:, 0].numpy() - true, axis=1) / gsd
            assert err_px.max() <= 1.5, (score, err_px)
            if score == "zncc":  # normalised: a true match of speckled, inverted SAR scores well below 1
                assert ((res.peak > 0.1) & (res.peak < 0.9)).all(), res.peak
    # the template is zero-mean per orientation; the map's descriptors are unit vectors
    # where there is an edge and zero in flat blocks
    dq = cfog(q, "sar")
    assert dq.mean(dim=(2, 3)).abs().max() < 1e-5
    n = whole.norm(dim=0)
    assert n.max() <= 1 + 1e-4 and 0.2 < float((n > 0.95).float().mean()) < 0.95
    # the same search on raw intensities (an identity "descriptor"): inverted, speckled
    # brightness does not correlate with the optical, so most patches are lost
    raw = build_feature_mosaic(_Identity(), img[:1], np.ones(img.shape[1:], bool), ox, oy, gsd, tile_px=128, margin_px=32)
    res_raw = align_to_mosaic(q - q.mean(dim=(2, 3), keepdim=True), raw, torch.from_numpy(centres)[:, None], S, max_shift_px=36)
    err_raw = np.linalg.norm(res_raw.position_m[:, 0].numpy() - true, axis=1) / gsd
    assert np.mean(err_raw <= 1.5) <= 0.5, err_raw


def test_zncc_scores_the_match_not_the_busiest_window():
    """correlate_zncc is the zero-mean normalised correlation at every offset (checked against
    a direct computation), blind to the context's gain and offset; where a window holds the
    template three times as strong under heavy clutter, raw correlation picks it and ZNCC picks
    the clean match."""
    from cmpc.localize.align import correlate, correlate_zncc

    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 4, 16, 16, generator=g)
    ctx = 0.1 * torch.randn(1, 2, 4, 30, 30, generator=g)
    ctx[0, 0, :, 3:19, 5:21] += t[0]  # candidate 0: the match, light noise
    ctx[0, 1, :, 7:23, 2:18] += 3 * t[0] + 4 * torch.randn(4, 16, 16, generator=g)  # candidate 1: strong but cluttered
    z = correlate_zncc(t, ctx)
    assert z.shape == (1, 2, 15, 15) and float(z.abs().max()) <= 1 + 1e-5
    tz = t[0] - t[0].mean(dim=(1, 2), keepdim=True)
    for m, r, c in ((0, 3, 5), (1, 7, 2), (1, 0, 0)):
        w = ctx[0, m, :, r : r + 16, c : c + 16]
        w = w - w.mean(dim=(1, 2), keepdim=True)
        assert float(z[0, m, r, c]) == pytest.approx(float((tz * w).sum() / (tz.norm() * w.norm())), abs=1e-5)
    assert float(z[0, 0, 3, 5]) > 0.99 and 0.4 < float(z[0, 1, 7, 2]) < 0.8
    raw = correlate(t, ctx)
    assert int(raw.flatten(1).argmax()) // (15 * 15) == 1  # raw correlation: the cluttered window wins
    assert int(z.flatten(1).argmax()) // (15 * 15) == 0
    assert torch.allclose(correlate_zncc(t, 5 * ctx + 2), z, atol=1e-4)
    # a flat window (no structure) scores 0, not a division by zero
    assert float(correlate_zncc(t, torch.ones(1, 1, 4, 16, 16)).abs().max()) == 0.0


def test_zncc_is_for_stride_one_descriptors(tmp_path):
    from cmpc.errors import ConfigError
    from cmpc.localize.refine import aligner_payload, refiner_from_checkpoint, refiner_payload, save_refiner

    img = _blocks(2, 64)
    learned = DenseDescriptor(1, 3, dim=8, width=16)
    fm = build_feature_mosaic(learned, img, np.ones(img.shape[1:], bool), 0.0, 640.0, 10.0, tile_px=64, margin_px=16, phases=True)
    with pytest.raises(ValueError, match="phase"):
        align_to_mosaic(learned(torch.zeros(1, 1, 32, 32), "sar"), fm, torch.tensor([[[320.0, 320.0]]]), 32, 8, score="zncc")
    path = save_refiner(tmp_path / "r.pt", aligner_payload(save_refiner(tmp_path / "full.pt", refiner_payload(None, learned, RefineConfig(), 10, 16, {"align": {"query_px": 32}}))))
    with pytest.raises(ConfigError, match="align_score=zncc is for refine.aligner=cfog"):
        refiner_from_checkpoint(path, RefineConfig(align_score="zncc"))
    assert refiner_from_checkpoint(path, RefineConfig(align_score="zncc", aligner="cfog", gate="config")).aligner.settings


class _Identity(torch.nn.Module):
    stride = 1
    dim = 1

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return x


def test_cfog_settings_change_its_identity_and_band_counts_are_free():
    a, b = CfogDescriptor(None, None), CfogDescriptor(None, None, sar_sigma=2.0)
    from cmpc.localize.refine import state_hash

    assert state_hash(a.state_dict()) != state_hash(b.state_dict())
    assert a(torch.rand(1, 4, 32, 32), "sar").shape == (1, 9, 32, 32)
    with pytest.raises(ValueError, match="modality"):
        a(torch.rand(1, 1, 8, 8), "optical")


def test_a_cfog_refiner_needs_no_checkpoint_and_refuses_a_calibrated_gate(tmp_path):
    cfg = RefineConfig(aligner="cfog", gate="config", align_min_peak=0.05, fine_top=3)
    r = load_refiner(tmp_path / "absent.pt", cfg, "unused")
    assert r is not None and r.gnn is None and isinstance(r.aligner, CfogDescriptor)
    assert r.align_min_peak == pytest.approx(0.05)
    # without aligner=cfog an absent refiner.pt still means no refiner
    assert load_refiner(tmp_path / "absent.pt", RefineConfig(), "unused") is None
    with pytest.raises(CheckpointError, match="align_min_peak"):
        cfog_refiner(RefineConfig(aligner="cfog", gate="calibrated"))
    # the learned descriptor is untouched by the default
    assert RefineConfig().aligner == "learned" and isinstance(DenseDescriptor(1, 3), torch.nn.Module)


def test_scene_georeferencing_refuses_cfog_before_loading_anything():
    from cmpc.config import load_experiment
    from cmpc.errors import ConfigError
    from cmpc.localize.georef import georeferencer_from_experiment

    exp = load_experiment("experiments/demo.json", ["refine.aligner=cfog", "name=no_such_run"])
    with pytest.raises(ConfigError, match="set refine.aligner=learned"):
        georeferencer_from_experiment(exp)


def test_box_sums_are_every_windows_sum():
    """box_sums against average pooling at stride 1 (times the window area): rectangular
    windows, one-row / one-column windows, a window as large as the input, leading dims."""
    import torch.nn.functional as F

    from cmpc.localize.align import box_sums

    x = torch.randn(2, 3, 4, 17, 23, dtype=torch.float64)
    for h, w in ((3, 5), (1, 7), (6, 1), (17, 23), (1, 1)):
        ref = F.avg_pool2d(x.reshape(-1, 1, 17, 23), (h, w), stride=1).reshape(2, 3, 4, 18 - h, 24 - w) * (h * w)
        got = box_sums(x, h, w)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-9), (h, w)


def test_map_window_norms_are_each_contexts():
    """FeatureMosaic.window_norms (the whole map's window norms, computed once in float64)
    equals the zero-mean norm of every window of each context crops() cuts, for contexts
    inside the map, across its edges and wholly outside it (zeros), and for a larger context
    asked later (the cached border grows); window_deviation's per-context float32 agrees to 5e-3
    on norms of about 18."""
    from cmpc.localize.align import FeatureMosaic, box_sums, window_deviation

    g = torch.Generator().manual_seed(0)
    desc = torch.rand(9, 70, 90, generator=g)
    desc[:, 30:45, 10:40] = 0.3  # a flat patch: norms near 0 there
    fm = FeatureMosaic(desc=desc, origin_x=0.0, origin_y=0.0, gsd_m=1.0, stride=1)
    top = torch.tensor([[0, 5, -10], [60, 40, -200]])
    left = torch.tensor([[0, 70, -3], [85, 12, 300]])
    # computed only once the contexts asked for cover norms_after times the padded map
    # (8 x (70 + 2 x 32) x (90 + 2 x 32) = 165,088 context cells)
    # (6 contexts of 24 x 28 cells = 4,032 per call: the 41st call passes 165,088)
    got = [fm.window_norms(top, left, 16, 20, 9, 9) for _ in range(41)]
    assert all(x is None for x in got[:40]) and got[40] is not None
    h, w = 16, 20
    for n in (9, 27):
        ctx = fm.crops(top, left, h + n - 1, w + n - 1).double()
        c = ctx - ctx.mean(dim=(-2, -1), keepdim=True)
        exact = (box_sums((c * c).sum(-3), h, w) - (box_sums(c, h, w) ** 2).sum(-3) / (h * w)).clamp_min(0).sqrt()
        got = fm.window_norms(top, left, h, w, n, n)
        assert got.shape == exact.shape == (2, 3, n, n)
        assert torch.allclose(got.double(), exact, atol=1e-5), float((got.double() - exact).abs().max())
        assert torch.allclose(window_deviation(ctx.float(), h, w).double(), exact, atol=5e-3), float((window_deviation(ctx.float(), h, w).double() - exact).abs().max())
        assert float(got[1, 2].abs().max()) < 1e-5  # wholly outside the map: zero (to round-off)
    assert float(exact.max()) > 15.0 and float(exact[0, 1].min()) < 1e-3  # real norms, and ~0 over the flat patch


def test_zncc_alignment_is_the_same_with_map_norms():
    """align_to_mosaic with score=zncc: a stored map (norms read from the whole map's) and the
    same map without them (norms from each context) give the same peaks and positions."""
    from cmpc.localize.align import FeatureMosaic, align_to_mosaic

    g = torch.Generator().manual_seed(1)
    desc = torch.rand(9, 160, 160, generator=g)
    fm = FeatureMosaic(desc=desc, origin_x=0.0, origin_y=160.0, gsd_m=1.0, stride=1, norms_after=0.0)

    class PerContext(FeatureMosaic):
        def window_norms(self, *a, **k):  # noqa: ANN002, ANN003
            return None

    plain = PerContext(desc=desc, origin_x=0.0, origin_y=160.0, gsd_m=1.0, stride=1)
    q = desc[:, 40:72, 50:82][None] + 0.05 * torch.rand(1, 9, 32, 32, generator=g)  # a noisy copy of a window
    centres = torch.tensor([[[66.0 + 3, 160.0 - 56 - 2], [20.0, 20.0], [150.0, 150.0]]])  # near it, and two elsewhere (one at the edge)
    a = align_to_mosaic(q, fm, centres, 32, 8, score="zncc")
    b = align_to_mosaic(q, plain, centres, 32, 8, score="zncc")
    assert torch.allclose(a.peak, b.peak, atol=1e-4) and torch.allclose(a.position_m, b.position_m, atol=1e-3), (a, b)
    assert float(a.peak[0, 0]) > 0.9 and float((a.position_m[0, 0] - torch.tensor([66.0, 104.0])).abs().max()) < 0.5  # found
    assert float(a.peak[0, 1:].max()) < 0.5  # elsewhere: no match


def test_spread_candidates_skip_near_duplicates_and_backfill():
    from cmpc.localize.refine import spread_candidates

    ranked = np.array([[[0, 0], [10, 0], [100, 0], [5, 5], [300, 0], [110, 0]]], float)
    assert spread_candidates(ranked, 3, 50.0).tolist() == [[0, 2, 4]]
    assert spread_candidates(ranked, 5, 50.0).tolist() == [[0, 2, 4, 1, 3]]  # the skipped fill up, in rank order
    assert spread_candidates(ranked, 3, 0.0).tolist() == [[0, 1, 2]]  # off: plain rank order
    assert spread_candidates(ranked, 3, 5.0).tolist() == [[0, 1, 2]]  # (5, 5) is 7.07 m from (0, 0): kept
    assert spread_candidates(ranked, 6, 50.0).tolist() == [[0, 1, 2, 3, 4, 5]]  # all taken anyway


def test_spreading_the_candidates_reaches_a_place_that_near_duplicates_hide():
    """A dense reference grid puts several neighbours of one wrong place at the top of the
    list: aligning around the first m finds nothing right, while skipping candidates within
    the search radius of one already taken reaches the true place at rank 7."""
    from cmpc.localize.refine import spread_candidates

    img = _blocks(3, 384)
    ox, oy, gsd, S = 1000.0, 5000.0, 8.0, 96
    cfog = CfogDescriptor(1, 3, sigma=0.8, sar_sigma=1.0)
    fm = build_feature_mosaic(cfog, img, np.ones(img.shape[1:], bool), ox, oy, gsd, tile_px=128, margin_px=32)
    rng = np.random.default_rng(2)
    r, c = 250, 240
    q = torch.from_numpy(_sar_like(img[:, r : r + S, c : c + S], rng))[None]
    true = np.array([ox + (c + S / 2) * gsd, oy - (r + S / 2) * gsd])
    wrong = np.array([ox + 100 * gsd, oy - 100 * gsd])
    near_wrong = [wrong + np.array([dx, dy]) * gsd for dx, dy in ((0, 0), (16, 0), (0, 16), (16, 16), (-16, 0), (0, -16))]
    ranked = np.stack([*near_wrong, true + np.array([20, -12]) * gsd])[None]  # (1, 7, 2)
    found = {}
    for spread_px in (0, 40):
        cols = spread_candidates(ranked, 3, spread_px * gsd)
        res = align_to_mosaic(cfog(q, "sar"), fm, torch.from_numpy(np.take_along_axis(ranked, cols[..., None], 1)), S, max_shift_px=36, score="zncc")
        best = int(res.peak[0].argmax())
        found[spread_px] = np.linalg.norm(res.position_m[0, best].numpy() - true) / gsd
    assert found[0] > 50 and found[40] <= 1.5, found
