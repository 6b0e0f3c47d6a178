"""Whole-map dense search (cmpc.localize.dense_search): known placements on a textured map.

The descriptor network is a real DenseDescriptor with random weights whose SAR branch is a
copy of its optical branch, and the "SAR scene" is a crop of the optical map: the crop's
descriptors then match the map's at one place only, which the search must report, through
several FFT blocks, over the map's edge, and inside / outside a prior disc. Random weights
give descriptors with a large common component (every cell alike); the branch's batch-norm
statistics and last bias are set from the map so that the descriptors are centred, as
trained ones are. Crops start on the 4-pixel cell grid: the search's resolution is a cell
(sub-cell placement is fine alignment's job), and random descriptors are not shift-smooth.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from cmpc.localize.align import build_feature_mosaic
from cmpc.localize.dense_search import MapSpectra, _local_maxima, peak_margin, search_map
from cmpc.localize.verify import SceneTransform
from cmpc.models.descriptor import DenseDescriptor

GSD = 2.0  # metres per map pixel
#: the default search averages 2 x 2 cells: a placement is then within one cell (4 px) per axis
POOLED_TOL_M = math.hypot(4.0, 4.0) * GSD + 1e-6
ORIGIN = (500_000.0, 4_200_000.0)


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    net = DenseDescriptor(1, 1, dim=16, width=16)
    rng = np.random.default_rng(3)
    img = gaussian_filter(rng.normal(size=(640, 720)), 2.0)
    img = ((img - img.mean()) / img.std()).astype(np.float32)[None]
    branch = net.branches["opt"]
    with torch.no_grad():
        for m in branch.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # running statistics = this one batch's
        branch.train()
        branch(torch.from_numpy(img)[None])
        branch.eval()
        branch[-1].bias -= branch(torch.from_numpy(img)[None]).mean(dim=(0, 2, 3))
    net.branches["sar"].load_state_dict(branch.state_dict())
    net.eval()
    valid = np.ones(img.shape[1:], dtype=bool)
    fm = build_feature_mosaic(net, img, valid, ORIGIN[0], ORIGIN[1], GSD, tile_px=256, margin_px=32)
    return net, img, fm


def _truth(row: int, col: int) -> SceneTransform:
    return SceneTransform.from_params(GSD, 0.0, ORIGIN[0] + col * GSD, ORIGIN[1] - row * GSD)


def _err(t: SceneTransform, truth: SceneTransform, w: int, h: int) -> float:
    return float(np.linalg.norm(t.centre(w, h) - truth.centre(w, h)))


def test_finds_the_crop_through_several_blocks(world):
    net, img, fm = world
    spectra = MapSpectra(fm, block_cells=64, pool=1)  # 160 x 180 cells: several blocks per axis
    (bh, bw), _, blocks = spectra.layout(32, 32)
    assert len(blocks) >= 9 and bh <= 64 and bw <= 64
    for row, col in ((332, 216), (40, 600), (500, 28)):
        crop = img[:, row : row + 128, col : col + 128]
        peaks = search_map(net, spectra, crop, np.ones(crop.shape[1:], bool), GSD, [0.0], top_n=3)
        assert len(peaks) == 3 and peaks[0].peak > peaks[1].peak
        assert _err(peaks[0].transform, _truth(row, col), 128, 128) < 1e-6  # on the cell grid: exact
        assert peaks[0].peak > 0.8 and peaks[0].peak - peaks[1].peak > 0.5
        m = peak_margin(peaks[0].transform, peaks[0].peak, peaks, 100.0, (64.0, 64.0))
        assert m == pytest.approx(peaks[0].peak - peaks[1].peak)


def test_pooled_search_is_within_a_cell(world):
    net, img, fm = world
    sp = MapSpectra(fm, pool=2)
    assert sp.desc.shape[1:] == (80, 90) and torch.allclose(sp.desc.norm(dim=0), torch.ones(80, 90), atol=1e-4)
    for row, col in ((332, 216), (44, 604), (500, 28)):  # on the pooled grid or one cell off it
        crop = img[:, row : row + 128, col : col + 128]
        peaks = search_map(net, sp, crop, np.ones(crop.shape[1:], bool), GSD, [0.0], top_n=2)
        assert _err(peaks[0].transform, _truth(row, col), 128, 128) <= POOLED_TOL_M
        assert peaks[0].peak - peaks[1].peak > 0.1  # random descriptors are not shift-smooth: one cell off the grid costs peak


def test_a_scene_hanging_over_the_map_edge(world):
    net, img, fm = world
    # the scene's first 40 rows / 24 columns lie north-west of the map (no data there)
    crop = np.zeros((1, 128, 128), np.float32)
    crop[:, 40:, 24:] = img[:, :88, :104]
    valid = np.zeros((128, 128), bool)
    valid[40:, 24:] = True
    peaks = search_map(net, MapSpectra(fm, block_cells=64, pool=1), crop, valid, GSD, [0.0], top_n=2)
    assert _err(peaks[0].transform, _truth(-40, -24), 128, 128) < 1e-6


def test_prior_disc_limits_the_search(world):
    net, img, fm = world
    row, col = 332, 216
    crop = img[:, row : row + 128, col : col + 128]
    ok = np.ones((128, 128), bool)
    truth = _truth(row, col)
    cx, cy = truth.centre(128, 128)
    sp = MapSpectra(fm, block_cells=96, pool=1)
    inside = search_map(net, sp, crop, ok, GSD, [0.0], top_n=2, prior=(cx + 150.0, cy - 90.0, 300.0))
    assert _err(inside[0].transform, truth, 128, 128) < 1e-6
    outside = search_map(net, sp, crop, ok, GSD, [0.0], top_n=2, prior=(cx + 600.0, cy, 200.0))
    for p in outside:  # every answer lies in the disc, so none is the truth
        c = p.transform.centre(128, 128)
        assert math.hypot(c[0] - cx - 600.0, c[1] - cy) <= 200.0 + 1e-6
        assert p.peak < inside[0].peak - 0.5


def test_heading_hypotheses(world):
    net, img, fm = world
    # a scene looking 10 degrees east of north: the map sampled at every scene pixel centre
    truth = SceneTransform.from_params(GSD, 10.0, ORIGIN[0] + 300 * GSD, ORIGIN[1] - 250 * GSD)
    cols, rows = np.meshgrid(np.arange(128) + 0.5, np.arange(128) + 0.5)
    xy = truth.apply(np.stack([cols.ravel(), rows.ravel()], axis=1))
    mc = (xy[:, 0] - ORIGIN[0]) / GSD - 0.5
    mr = (ORIGIN[1] - xy[:, 1]) / GSD - 0.5
    scene = map_coordinates(img[0], [mr, mc], order=1).reshape(1, 128, 128).astype(np.float32)
    peaks = search_map(net, MapSpectra(fm), scene, np.ones((128, 128), bool), GSD, [-10.0, 0.0, 10.0], top_n=1)
    assert peaks[0].heading_deg == 10.0
    assert _err(peaks[0].transform, truth, 128, 128) <= POOLED_TOL_M


def test_local_maxima_are_separated():
    s = torch.zeros(40, 40)
    s[10, 10], s[11, 12], s[30, 5], s[20, 33] = 1.0, 0.9, 0.8, 0.7
    got = _local_maxima(s, top_n=3, sep=4)
    assert [(u, v) for _, u, v in got] == [(10, 10), (30, 5), (20, 33)]  # (11, 12) is within 4 cells of the best
    assert [round(v, 3) for v, _, _ in got] == [1.0, 0.8, 0.7]
