"""Ground layout of the synthetic world: urban density, roads, parcels, water, forests.

The world is a stationary random process (no single centre), so every part of it, west
or east, holds both towns and countryside:

- urban density: a smooth random field plus town "bumps" on a jittered grid (~650 m);
- arterial roads: edges of a coarse Voronoi diagram (seeds ~300 m apart) drawn in
  domain-warped coordinates, so they bend; 10-18 m wide, bridges over water;
- blocks and parcels: a finer warped Voronoi diagram whose seed spacing follows the
  density (about 55 m in town centres, 150 m in the fields). Each cell gets a land-use
  zone from the density at its seed (fields, meadows, forest, fallow, farms, houses,
  apartments, downtown, industrial, parks, parking lots, building sites). Cell edges are
  streets (5-9 m) in town and tracks, hedgerows or bare boundaries in the country;
- water: a meandering river (25-65 m wide) crossing the world west to east, plus small
  lakes and ponds;
- forests and hedgerows as textured canopy heights.

Everything is vectorised over pixels; loops run over objects (seeds, lakes), never pixels.
Sizes are in metres and converted with ``gsd_m``; positions in pixels (row, col).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from cmpc.data.synth.noise import approx_distance, poisson_disc, smooth_noise, upsample_bilinear
from cmpc.data.synth.scene import (
    APARTMENTS, ASPHALT, BUILDSITE, CONCRETE, CONSTRUCTION, CROP, CROP_NAMES, DOWNTOWN, FALLOW, FARM, FIELD,
    FOREST, GRASS, GRAVEL, HOUSES, INDUSTRIAL, MEADOW, PARK, PARKING, SOIL, URBAN_ZONES, WATER, ObjectTable,
)

# Zone probabilities by urban density band (rows: density bands, columns: zones).
_DENSITY_BANDS = np.array([0.28, 0.5, 0.72])  # rural | suburban | urban | core
_ZONE_P = np.zeros((4, 12))
_ZONE_P[0, [FIELD, MEADOW, FOREST, FALLOW, FARM, HOUSES]] = [0.50, 0.16, 0.18, 0.06, 0.08, 0.02]
_ZONE_P[1, [HOUSES, PARK, FIELD, MEADOW, INDUSTRIAL, APARTMENTS, FOREST, BUILDSITE]] = [
    0.56, 0.08, 0.09, 0.05, 0.09, 0.07, 0.04, 0.02]
_ZONE_P[2, [APARTMENTS, HOUSES, INDUSTRIAL, DOWNTOWN, PARK, PARKING, BUILDSITE]] = [
    0.34, 0.20, 0.12, 0.17, 0.08, 0.05, 0.04]
_ZONE_P[3, [DOWNTOWN, APARTMENTS, PARK, PARKING, BUILDSITE]] = [0.62, 0.20, 0.08, 0.06, 0.04]

_ZONE_GROUND = np.array(
    # FIELD MEADOW FOREST FALLOW FARM HOUSES APARTMENTS DOWNTOWN INDUSTRIAL PARK PARKING BUILDSITE
    [CROP, GRASS, GRASS, SOIL, CROP, GRASS, GRASS, CONCRETE, CONCRETE, GRASS, ASPHALT, CONSTRUCTION],
    dtype=np.uint8,
)

# Edge kinds of the parcel Voronoi diagram.
EDGE_NONE, EDGE_STREET, EDGE_TRACK, EDGE_HEDGE = 0, 1, 2, 3


@dataclass
class Layout:
    """The static ground of the world (what does not change between acquisitions).

    (H, W) arrays: ``density`` [0, 1]; ``material`` ground material codes; ``ground_h``
    (bridge decks, metres); ``canopy_h`` forest/hedgerow canopy height (metres);
    ``parcel_id`` Voronoi cell id + 1; ``road_dist_m`` distance to the nearest road pixel;
    ``water_dist_m`` distance to the nearest water pixel (0 on water); ``edge_dist_m``
    distance to the nearest parcel edge; ``street_side`` True on the verge of tree-lined
    streets; ``road_dir`` local direction (radians, in the (col, row) frame) of the nearest
    street or parcel edge (arterial direction on arterials), to align buildings and cars.
    """

    gsd_m: float
    density: np.ndarray
    material: np.ndarray
    ground_h: np.ndarray
    canopy_h: np.ndarray
    parcel_id: np.ndarray
    road_dist_m: np.ndarray
    water_dist_m: np.ndarray
    edge_dist_m: np.ndarray
    street_side: np.ndarray
    road_dir: np.ndarray
    arterial: np.ndarray
    parcels: ObjectTable
    river_axis: list[np.ndarray] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.material.shape  # type: ignore[return-value]


# --------------------------------------------------------------------------- helpers


def pair_hash(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) value per unordered pair of cell ids (splitmix64)."""
    lo = np.minimum(a, b).astype(np.uint64)
    hi = np.maximum(a, b).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = lo * np.uint64(0x9E3779B97F4A7C15) + hi * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(salt & 0xFFFFFFFF)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def voronoi_edges(
    seeds: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest and second-nearest seed of each query point and its distance to their bisector.

    ``seeds`` (S, 2) in (row, col) pixels; ``rows``/``cols`` query coordinates (any shape).
    Returns ``(i1, i2, d_edge)``, shaped like ``rows``: the distance (pixels) from the
    point to the Voronoi edge between its cell and the nearest neighbouring cell.
    """
    tree = cKDTree(seeds)
    q = np.stack([rows.ravel(), cols.ravel()], axis=1)
    n = len(q)
    i1 = np.empty(n, np.int32)
    i2 = np.empty(n, np.int32)
    de = np.empty(n, np.float32)
    for s in range(0, n, chunk):
        d, i = tree.query(q[s : s + chunk], k=2)
        sep = np.linalg.norm(seeds[i[:, 0]] - seeds[i[:, 1]], axis=1)
        i1[s : s + chunk] = i[:, 0]
        i2[s : s + chunk] = i[:, 1]
        # Distance to the perpendicular bisector of the two nearest seeds (exact for a point
        # whose two nearest seeds define the nearest edge).
        de[s : s + chunk] = (d[:, 1] ** 2 - d[:, 0] ** 2) / (2.0 * np.maximum(sep, 1e-9))
    return i1.reshape(rows.shape), i2.reshape(rows.shape), de.reshape(rows.shape)


def voronoi_cells(
    seeds: np.ndarray, warp_r: np.ndarray, warp_c: np.ndarray, step: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-resolution warped Voronoi: like :func:`voronoi_edges` on every pixel of the (H, W)
    grid displaced by ``warp_r``/``warp_c`` (pixels), at a fraction of the cost.

    The four nearest seeds are searched on a grid of every ``step``-th pixel; each pixel then
    picks its two nearest among the candidates of the closest grid point, exactly (a
    candidate set 2 px away misses the true neighbour only next to a Voronoi vertex).
    """
    h, w = warp_r.shape
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    qr = (rows[::step] + warp_r[::step, ::step]).ravel()
    qc = (cols[:, ::step] + warp_c[::step, ::step]).ravel()
    k = min(4, len(seeds))
    _, idx = cKDTree(seeds).query(np.stack([qr, qc], axis=1), k=k)
    idx = idx.reshape(len(range(0, h, step)), len(range(0, w, step)), k).astype(np.int32)
    ri = np.minimum(np.rint(np.arange(h) / step).astype(np.intp), idx.shape[0] - 1)
    ci = np.minimum(np.rint(np.arange(w) / step).astype(np.intp), idx.shape[1] - 1)
    pr = rows + warp_r
    pc = cols + warp_c
    sd = seeds.astype(np.float32)
    best_d = np.full((h, w), np.inf, np.float32)
    second_d = np.full((h, w), np.inf, np.float32)
    best_i = np.zeros((h, w), np.int32)
    second_i = np.zeros((h, w), np.int32)
    for j in range(k):
        cj = idx[ri, :, j][:, ci]
        dj = (pr - sd[cj, 0]) ** 2 + (pc - sd[cj, 1]) ** 2
        closer = dj < best_d
        mid = ~closer & (dj < second_d)
        second_d = np.where(closer, best_d, np.where(mid, dj, second_d))
        second_i = np.where(closer, best_i, np.where(mid, cj, second_i))
        best_d = np.where(closer, dj, best_d)
        best_i = np.where(closer, cj, best_i)
    sep = np.hypot(sd[best_i, 0] - sd[second_i, 0], sd[best_i, 1] - sd[second_i, 1])
    d_edge = (second_d - best_d) / (2.0 * np.maximum(sep, 1e-6))
    return best_i, second_i, d_edge.astype(np.float32)


def _jittered_candidates(rng: np.random.Generator, shape: tuple[int, int], spacing_px: float, margin_px: float) -> np.ndarray:
    """Uniform random candidate points (N, 2) about ``spacing_px`` apart on average,
    covering the world plus a margin (so cells at the border look like interior cells)."""
    h, w = shape
    area = (h + 2 * margin_px) * (w + 2 * margin_px)
    n = max(8, int(area / spacing_px**2))
    pts = rng.uniform(0.0, 1.0, (n, 2)) * [h + 2 * margin_px, w + 2 * margin_px] - margin_px
    return pts


def _density_field(rng: np.random.Generator, shape: tuple[int, int], gsd: float) -> tuple[np.ndarray, list]:
    """Urban density in [0, 1]: smooth noise plus town bumps on a jittered ~650 m grid."""
    h, w = shape
    base = smooth_noise(rng, shape, 260.0 / gsd)
    density = 0.24 + 0.13 * base
    cell = 650.0 / gsd
    ny, nx = max(1, int(np.ceil(h / cell))), max(1, int(np.ceil(w / cell)))
    step = max(1.0, 8.0 / gsd)  # bumps evaluated on a coarse grid, then interpolated
    ch, cw = int(np.ceil(h / step)) + 3, int(np.ceil(w / step)) + 3
    gr, gc = np.meshgrid(np.arange(ch) * step, np.arange(cw) * step, indexing="ij")
    bumps = np.zeros((ch, cw), np.float32)
    towns = []
    for iy in range(ny):
        for ix in range(nx):
            if rng.random() > 0.62:
                continue
            r = (iy + rng.random()) * cell
            c = (ix + rng.random()) * cell
            sigma = rng.uniform(90.0, 250.0) / gsd
            amp = rng.uniform(0.45, 0.95)
            bumps = np.maximum(bumps, amp * np.exp(-((gr - r) ** 2 + (gc - c) ** 2) / (2 * sigma**2)).astype(np.float32))
            towns.append((float(r), float(c), float(sigma * gsd), float(amp)))
    density += upsample_bilinear(bumps, shape, step)
    return np.clip(density, 0.0, 1.0).astype(np.float32), towns


def _river(rng: np.random.Generator, shape: tuple[int, int], gsd: float) -> tuple[np.ndarray, np.ndarray]:
    """A meandering west-east river: (water mask (H, W), centre row per column (W,))."""
    h, w = shape
    x_m = np.arange(w) * gsd
    y = rng.uniform(0.3, 0.7) * h * gsd
    for lam, amp in ((rng.uniform(700, 1600), rng.uniform(50, 140)), (rng.uniform(250, 500), rng.uniform(10, 35))):
        y = y + amp * np.sin(2 * np.pi * x_m / lam + rng.uniform(0, 2 * np.pi))
    centre = y / gsd  # pixels
    width_m = 42.0 + 12.0 * np.sin(2 * np.pi * x_m / rng.uniform(300, 800) + rng.uniform(0, 2 * np.pi))
    slope = np.gradient(centre)
    rows = np.arange(h, dtype=np.float32)[:, None]
    # Perpendicular distance to a locally straight centre line.
    dist_m = np.abs(rows - centre[None, :]) * gsd / np.sqrt(1.0 + slope[None, :] ** 2)
    return dist_m < (width_m[None, :] / 2.0), centre


def _lakes(
    rng: np.random.Generator, shape: tuple[int, int], gsd: float, allowed: np.ndarray, clip: np.ndarray, n: int
) -> np.ndarray:
    """Up to ``n`` irregular small lakes/ponds (radius 12-45 m) centred on ``allowed`` pixels,
    kept inside ``clip`` (a lake may end at a parcel edge, never across a road)."""
    h, w = shape
    mask = np.zeros(shape, bool)
    cand = np.flatnonzero(allowed.ravel())
    if n <= 0 or cand.size == 0:
        return mask
    for idx in rng.choice(cand, size=min(n, cand.size), replace=False):
        r0, c0 = divmod(int(idx), w)
        rad = rng.uniform(12.0, 45.0) / gsd
        half = int(rad * 1.8) + 2
        r_lo, r_hi, c_lo, c_hi = max(0, r0 - half), min(h, r0 + half), max(0, c0 - half), min(w, c0 + half)
        rr, cc = np.mgrid[r_lo:r_hi, c_lo:c_hi]
        ang = np.arctan2(rr - r0, cc - c0)
        # Radius modulated by a few random harmonics: irregular but closed shorelines.
        k = np.arange(1, 5)
        wob = (rng.uniform(0.06, 0.2, 4)[:, None, None] * np.cos(k[:, None, None] * ang + rng.uniform(0, 6.3, 4)[:, None, None])).sum(0)
        stretch = rng.uniform(0.6, 1.0)
        rot = rng.uniform(0, np.pi)
        u = (cc - c0) * np.cos(rot) + (rr - r0) * np.sin(rot)
        v = (-(cc - c0) * np.sin(rot) + (rr - r0) * np.cos(rot)) / stretch
        mask[r_lo:r_hi, c_lo:c_hi] |= np.hypot(u, v) < rad * (1.0 + wob)
    return mask & clip


# --------------------------------------------------------------------------- main


def build_layout(rng: np.random.Generator, shape: tuple[int, int], gsd_m: float) -> Layout:
    """Generate the static ground layout of a world of ``shape`` pixels at ``gsd_m``."""
    h, w = shape
    gsd = float(gsd_m)
    density, towns = _density_field(rng, shape, gsd)

    # ---- arterial roads: coarse warped Voronoi, evaluated on a coarse grid (smooth field)
    step = max(1.0, 4.0 / gsd)
    ch, cw = int(np.ceil(h / step)) + 3, int(np.ceil(w / step)) + 3
    cr, cc = np.meshgrid(np.arange(ch) * step, np.arange(cw) * step, indexing="ij")
    warp_a = 28.0 / gsd
    wr = smooth_noise(rng, (ch, cw), 220.0 / gsd / step) * warp_a
    wc = smooth_noise(rng, (ch, cw), 220.0 / gsd / step) * warp_a
    art_cand = _jittered_candidates(rng, shape, 170.0 / gsd, 300.0 / gsd)
    art_seeds = art_cand[poisson_disc(rng, art_cand, np.full(len(art_cand), 300.0 / gsd))]
    a1, a2, ade = voronoi_edges(art_seeds, cr + wr, cc + wc)
    art_width_m = 10.0 + 8.0 * pair_hash(a1, a2, 11)
    art_margin = ade - art_width_m.astype(np.float32) / (2.0 * gsd)  # < 0 on the arterial road
    art_margin = upsample_bilinear(art_margin, shape, step)
    gy, gx = np.gradient(upsample_bilinear(ade, shape, step))
    art_dir = (np.arctan2(gy, gx) + np.pi / 2).astype(np.float32)
    del gy, gx

    # ---- parcels / blocks: finer warped Voronoi at full resolution, spacing follows density
    spacing_m = lambda d: 125.0 - 72.0 * d  # noqa: E731  seed spacing, metres
    cand = _jittered_candidates(rng, shape, 40.0 / gsd, 150.0 / gsd)
    cr_i = np.clip(cand[:, 0], 0, h - 1).astype(int)
    cc_i = np.clip(cand[:, 1], 0, w - 1).astype(int)
    min_d = 0.8 * spacing_m(density[cr_i, cc_i]) / gsd
    seeds = cand[poisson_disc(rng, cand, min_d)]
    n_cells = len(seeds)
    warp_l = 7.0 / gsd
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    i1, i2, lde = voronoi_cells(
        seeds, smooth_noise(rng, shape, 45.0 / gsd) * warp_l, smooth_noise(rng, shape, 45.0 / gsd) * warp_l,
        step=4 if min(h, w) >= 256 else 1,
    )
    # Local edge direction: perpendicular to the gradient of the edge distance.
    gy, gx = np.gradient(lde)
    edge_dir = (np.arctan2(gy, gx) + np.pi / 2).astype(np.float32)
    del gy, gx

    # ---- zones and parcel attributes
    sr = np.clip(seeds[:, 0], 0, h - 1).astype(int)
    sc = np.clip(seeds[:, 1], 0, w - 1).astype(int)
    band = np.searchsorted(_DENSITY_BANDS, density[sr, sc])
    u = rng.random(n_cells)
    cum = np.cumsum(_ZONE_P[band], axis=1)
    zone = np.minimum((u[:, None] > cum / cum[:, -1:]).sum(axis=1), 11).astype(np.uint8)
    crop = rng.integers(0, len(CROP_NAMES), n_cells).astype(np.uint8)
    tone = rng.uniform(-1.0, 1.0, n_cells).astype(np.float32)
    row_angle = rng.uniform(0, np.pi, n_cells).astype(np.float32)
    row_period = rng.uniform(3.0, 9.0, n_cells).astype(np.float32)
    parcel_id = (i1 + 1).astype(np.int32)
    zone_px = zone[i1]

    # ---- edge kinds
    urban = np.isin(zone, URBAN_ZONES)
    near = lde < (6.0 / gsd)
    e1, e2 = i1[near], i2[near]
    hsh = pair_hash(e1, e2, 101)
    hsh2 = pair_hash(e1, e2, 202)
    is_urban = urban[e1] | urban[e2]
    both_forest = (zone[e1] == FOREST) & (zone[e2] == FOREST)
    kind = np.full(e1.shape, EDGE_NONE, np.uint8)
    kind[is_urban & (hsh < 0.86)] = EDGE_STREET
    rural = ~is_urban
    kind[rural & (hsh < 0.32)] = EDGE_TRACK
    kind[rural & ~both_forest & (hsh >= 0.32) & (hsh < 0.62)] = EDGE_HEDGE
    width_m = np.where(kind == EDGE_STREET, 5.0 + 4.0 * hsh2, np.where(kind == EDGE_TRACK, 3.0 + hsh2, 4.0 + 3.0 * hsh2))
    on_edge = lde[near] * gsd < width_m / 2.0
    street = np.zeros(shape, bool)
    track = np.zeros(shape, bool)
    hedge = np.zeros(shape, bool)
    tree_lined = np.zeros(shape, bool)
    street[near] = on_edge & (kind == EDGE_STREET)
    track[near] = on_edge & (kind == EDGE_TRACK)
    hedge[near] = on_edge & (kind == EDGE_HEDGE)
    # Verge of tree-lined streets (a third of them): a 1.5 m band 1-2.5 m outside the asphalt.
    verge = (kind == EDGE_STREET) & (pair_hash(e1, e2, 303) < 0.35)
    d_out = lde[near] * gsd - width_m / 2.0
    tree_lined[near] = verge & (d_out > 1.0) & (d_out < 2.5)
    del near, e1, e2, hsh, hsh2, kind, width_m, on_edge, d_out, verge

    # ---- water
    river, centre = _river(rng, shape, gsd)
    river_axis = [centre.astype(np.float32)]
    lake_ok = np.isin(zone_px, (MEADOW, PARK, FIELD, FALLOW)) & (lde * gsd > 20.0) & (art_margin * gsd > 20.0) & ~river
    n_lakes = int(rng.poisson(1.2 * h * w * gsd * gsd / 1e6))
    lakes = _lakes(rng, shape, gsd, lake_ok, (lde * gsd > 3.0) & (art_margin > 0), n_lakes)
    water = river | lakes

    # ---- materials (later layers win)
    material = _ZONE_GROUND[zone_px]
    n_mix = smooth_noise(rng, shape, 14.0 / gsd)
    material[(zone_px == APARTMENTS) & (n_mix > 1.25)] = ASPHALT  # car parks between slabs
    material[(zone_px == DOWNTOWN) & (n_mix < -1.1)] = GRASS  # squares with lawns
    material[(zone_px == INDUSTRIAL) & (n_mix > 0.5)] = SOIL  # yards
    material[(zone_px == PARK) & (n_mix > 1.0)] = GRAVEL  # paths and playgrounds
    # Farmyards around the farm seed.
    farm_cells = np.flatnonzero(zone == FARM)
    rr_all = rows.astype(np.float32)
    for ci in farm_cells:
        r0, c0 = seeds[ci]
        rad = rng.uniform(25.0, 45.0) / gsd
        r_lo, r_hi = int(max(0, r0 - rad)), int(min(h, r0 + rad + 1))
        c_lo, c_hi = int(max(0, c0 - rad)), int(min(w, c0 + rad + 1))
        if r_lo >= r_hi or c_lo >= c_hi:
            continue
        sub = (rr_all[r_lo:r_hi] - r0) ** 2 + (cols[:, c_lo:c_hi] - c0) ** 2 < rad**2
        sub &= parcel_id[r_lo:r_hi, c_lo:c_hi] == ci + 1
        material[r_lo:r_hi, c_lo:c_hi][sub] = GRAVEL
    material[track] = GRAVEL
    material[street] = ASPHALT
    arterial = art_margin < 0
    material[arterial] = ASPHALT

    water_out = approx_distance(water) * gsd  # metres to water
    banks = (water_out > 0) & (water_out < 5.0) & ~arterial & ~street
    material[banks] = GRASS
    material[water & ~arterial] = WATER
    # Bridges: arterial decks over water ramp up to 6 m within 12 m of the bank.
    ground_h = np.zeros(shape, np.float32)
    bridge = water & arterial
    if bridge.any():
        water_in = approx_distance(~water) * gsd
        ground_h[bridge] = np.minimum(6.0, 0.5 * water_in[bridge] + 1.0)

    # ---- canopy: forests (with clearings) and hedgerows
    canopy_h = np.zeros(shape, np.float32)
    n_fine = smooth_noise(rng, shape, 2.0 / gsd)
    n_crown = smooth_noise(rng, shape, 3.5 / gsd)
    n_big = smooth_noise(rng, shape, 40.0 / gsd)
    forest = (zone_px == FOREST) & (material == GRASS) & (n_big < 1.3)
    canopy_h[forest] = 16.0 + 4.0 * n_crown[forest] + 1.5 * n_fine[forest]
    hedge_ok = hedge & (n_big > -1.4) & ~water & (material != ASPHALT)
    canopy_h[hedge_ok] = 9.0 + 2.5 * n_crown[hedge_ok] + n_fine[hedge_ok]
    np.maximum(canopy_h, 0.0, out=canopy_h)
    canopy_h[canopy_h < 3.0] = 0.0

    road_dir = np.where(arterial, art_dir, edge_dir).astype(np.float32)
    road = (material == ASPHALT) & (zone_px != PARKING)
    road_dist_m = approx_distance(road) * gsd
    street_side = tree_lined & ~road & (material != WATER)

    parcels = ObjectTable(
        {
            "zone": np.concatenate([[MEADOW], zone]).astype(np.uint8),
            "crop": np.concatenate([[0], crop]).astype(np.uint8),
            "tone": np.concatenate([[0.0], tone]).astype(np.float32),
            "row_angle": np.concatenate([[0.0], row_angle]).astype(np.float32),
            "row_period_m": np.concatenate([[4.0], row_period]).astype(np.float32),
            "seed_rc": np.concatenate([[[0.0, 0.0]], seeds]).astype(np.float32),
        }
    )
    stats = {
        "cells": float(n_cells),
        "arterial_seeds": float(len(art_seeds)),
        "towns": float(len(towns)),
        "lakes": float(n_lakes),
    }
    return Layout(
        gsd_m=gsd,
        density=density,
        material=material,
        ground_h=ground_h,
        canopy_h=canopy_h,
        parcel_id=parcel_id,
        road_dist_m=road_dist_m,
        water_dist_m=water_out,
        edge_dist_m=(lde * gsd).astype(np.float32),
        street_side=street_side,
        road_dir=road_dir,
        arterial=arterial,
        parcels=parcels,
        river_axis=river_axis,
        stats=stats,
    )
