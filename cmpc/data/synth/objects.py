"""Objects on the ground: buildings (footprints + heights), trees, cars, ships, point targets.

Objects are drawn as tables of parameters, then rasterised all at once: every rotated
rectangle ("part") is sampled on a sub-pixel grid in its own frame and the samples are
scattered into the world grid (``np.maximum.at`` on packed height/id keys), so the cost is
linear in the covered area with no loop over pixels.

Buildings per zone (sizes in metres; heights above ground):

- houses: 9-17 x 7-11, 4.5-8 m eaves, mostly gable roofs, some L-shaped;
- apartments: slabs 24-70 x 10-16, 9-30 m, some L-shaped;
- downtown: 14-50 x 12-32, ~20 m (log-normal, 8-60 m), courtyard blocks, 5 % towers (50-100 m);
- industrial: sheds 30-110 x 18-55, 6-14 m; farms: barns and houses around the farmyard.

Candidates are placed at random in buildable ground (setbacks from roads, water and parcel
edges), aligned with the nearest street, and accepted in priority order when they overlap
neither forbidden ground nor an already accepted (inflated) footprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmpc.data.synth.layout import Layout
from cmpc.data.synth.noise import approx_distance
from cmpc.data.synth.scene import (
    APARTMENTS, ASPHALT, BUILDSITE, CONCRETE, CONSTRUCTION, CROP, DOWNTOWN, FALLOW, FARM, FIELD, GRASS, GRAVEL, HOUSES,
    INDUSTRIAL, MEADOW, PARK, PARKING, SOIL, WATER,
)

# Roof palette (linear reflectance, RGB) and which roofs use which colours.
ROOF_COLOURS = np.array(
    [
        [0.42, 0.42, 0.42],  # 0 light grey
        [0.17, 0.17, 0.19],  # 1 dark grey
        [0.46, 0.21, 0.13],  # 2 terracotta
        [0.30, 0.20, 0.15],  # 3 brown
        [0.68, 0.68, 0.66],  # 4 white
        [0.22, 0.33, 0.29],  # 5 green metal
        [0.22, 0.27, 0.38],  # 6 blue metal
        [0.50, 0.45, 0.36],  # 7 beige
        [0.10, 0.10, 0.11],  # 8 tar
    ],
    dtype=np.float32,
)
_ROOF_P = {
    "gable": np.array([0.0, 0.22, 0.48, 0.2, 0.0, 0.0, 0.0, 0.1, 0.0]),
    "flat": np.array([0.32, 0.16, 0.0, 0.02, 0.18, 0.03, 0.03, 0.12, 0.14]),
    "metal": np.array([0.22, 0.08, 0.0, 0.0, 0.28, 0.2, 0.2, 0.02, 0.0]),
}
CAR_COLOURS = np.array(
    [[0.70, 0.70, 0.70], [0.06, 0.06, 0.07], [0.45, 0.46, 0.48], [0.25, 0.25, 0.26], [0.55, 0.08, 0.06],
     [0.08, 0.15, 0.40], [0.60, 0.55, 0.45]],
    dtype=np.float32,
)
_CAR_P = np.array([0.26, 0.2, 0.2, 0.14, 0.08, 0.08, 0.04])


@dataclass
class ZoneSpec:
    """Building statistics of one zone (metres, candidates per square metre)."""

    rate: float
    length: tuple[float, float]
    width: tuple[float, float]
    height: tuple[float, float]
    gable_p: float
    l_shape_p: float
    court_p: float
    tower_p: float
    gap_m: float
    setback_m: float
    palette: str


ZONE_SPECS: dict[int, ZoneSpec] = {
    HOUSES: ZoneSpec(1 / 260, (9, 17), (7, 11), (4.5, 8), 0.75, 0.25, 0.0, 0.0, 4.0, 4.0, "gable"),
    APARTMENTS: ZoneSpec(1 / 800, (24, 70), (10, 16), (9, 30), 0.0, 0.45, 0.0, 0.0, 10.0, 5.0, "flat"),
    DOWNTOWN: ZoneSpec(1 / 420, (14, 50), (12, 32), (8, 60), 0.0, 0.3, 0.25, 0.05, 0.8, 1.5, "flat"),
    INDUSTRIAL: ZoneSpec(1 / 2000, (30, 110), (18, 55), (6, 14), 0.0, 0.15, 0.0, 0.0, 8.0, 5.0, "metal"),
    FARM: ZoneSpec(1 / 220, (10, 40), (8, 18), (5, 10), 0.6, 0.2, 0.0, 0.0, 4.0, 3.0, "gable"),
    PARK: ZoneSpec(1 / 15000, (6, 15), (5, 10), (3, 6), 0.3, 0.0, 0.0, 0.0, 5.0, 5.0, "flat"),
    FIELD: ZoneSpec(1 / 60000, (12, 30), (8, 15), (5, 9), 0.5, 0.0, 0.0, 0.0, 5.0, 6.0, "metal"),
    MEADOW: ZoneSpec(1 / 60000, (12, 30), (8, 15), (5, 9), 0.5, 0.0, 0.0, 0.0, 5.0, 6.0, "gable"),
    BUILDSITE: ZoneSpec(1 / 2500, (15, 40), (10, 25), (3, 12), 0.0, 0.0, 0.0, 0.0, 6.0, 4.0, "flat"),
}
_BUILDABLE = np.zeros(16, bool)
_BUILDABLE[[GRASS, CONCRETE, SOIL, GRAVEL, CONSTRUCTION]] = True


@dataclass
class Parts:
    """Rotated rectangles: centre (row, col) px, length/width px along/across ``angle``
    (radians in the (col, row) frame), owner object id, base height m, roof kind
    (0 flat, 1 gable), and a height offset for rooftop structures (m)."""

    r: np.ndarray
    c: np.ndarray
    length: np.ndarray
    width: np.ndarray
    angle: np.ndarray
    owner: np.ndarray
    height: np.ndarray
    gable: np.ndarray
    ridge: np.ndarray

    @staticmethod
    def concat(items: list["Parts"]) -> "Parts":
        return Parts(*[np.concatenate([getattr(p, f) for p in items]) for f in Parts.__dataclass_fields__])

    def take(self, keep: np.ndarray) -> "Parts":
        return Parts(*[getattr(self, f)[keep] for f in Parts.__dataclass_fields__])


def raster_parts(
    parts: Parts, shape: tuple[int, int], step: float = 0.6, heights: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample every part on a ``step``-pixel grid in its own frame.

    Returns ``(part index, flat pixel index, height m)`` per sample inside the world; the
    height follows the roof (flat, or a gable ridge along the part's long side). With
    ``heights=False`` the heights are skipped (an empty array): footprint tests only.
    A step of 0.6 px leaves no holes in rotated rectangles; 1 px is enough for tests.
    """
    h, w = shape
    n_parts = len(parts.r)
    if n_parts == 0:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float32)
    nu = np.maximum(1, np.ceil(parts.length / step)).astype(np.int64)
    nv = np.maximum(1, np.ceil(parts.width / step)).astype(np.int64)
    n = nu * nv
    pidx = np.repeat(np.arange(n_parts, dtype=np.int32), n)
    j = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    nvp = nv[pidx]
    iu = j // nvp
    iv = (j - iu * nvp).astype(np.float32)
    iu = iu.astype(np.float32)
    del j, nvp
    # Sample (iu, iv) sits at u = (iu + 0.5) * su - L/2, v = (iv + 0.5) * sv - W/2 in the part
    # frame; fold rotation and offsets into one affine map per part.
    su = (parts.length / nu).astype(np.float32)
    sv = (parts.width / nv).astype(np.float32)
    ca, sa = np.cos(parts.angle).astype(np.float32), np.sin(parts.angle).astype(np.float32)
    u0 = 0.5 * su - parts.length / 2
    v0 = 0.5 * sv - parts.width / 2
    r0 = parts.r + u0 * sa + v0 * ca + 0.5
    c0 = parts.c + u0 * ca - v0 * sa + 0.5
    ri = np.floor(r0[pidx] + iu * (su * sa)[pidx] + iv * (sv * ca)[pidx]).astype(np.int64)
    ci = np.floor(c0[pidx] + iu * (su * ca)[pidx] - iv * (sv * sa)[pidx]).astype(np.int64)
    inside = (ri >= 0) & (ri < h) & (ci >= 0) & (ci < w)
    flat = ri * w + ci
    if not heights:
        return pidx[inside], flat[inside], np.zeros(0, np.float32)
    # Gable: height falls linearly from the ridge (along the long side) to the eaves.
    long_u = (parts.length >= parts.width)[pidx]
    au = np.abs((iu + 0.5) * su[pidx] / parts.length[pidx] * 2.0 - 1.0)
    av = np.abs((iv + 0.5) * sv[pidx] / parts.width[pidx] * 2.0 - 1.0)
    across = np.where(long_u, av, au)
    z = parts.height[pidx] + np.where(parts.gable[pidx] > 0, parts.ridge[pidx] * (1.0 - across), parts.ridge[pidx])
    return pidx[inside], flat[inside], z[inside].astype(np.float32)


def stamp_max(
    shape: tuple[int, int], flat: np.ndarray, z: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the highest sample wins: returns (height m (H, W) float32, id (H, W) int32),
    0 where nothing was drawn. Heights are quantised to 1/64 m to pack them with the id."""
    key = np.zeros(shape[0] * shape[1], np.int64)
    if len(flat):
        packed = (np.clip(np.round(z * 64.0), 1, 2**30).astype(np.int64) << 32) | ids.astype(np.int64)
        np.maximum.at(key, flat, packed)
    height = ((key >> 32).astype(np.float32) / 64.0).reshape(shape)
    oid = (key & 0xFFFFFFFF).astype(np.int32).reshape(shape)
    return height, oid


# --------------------------------------------------------------------------- buildings


@dataclass
class Buildings:
    """Accepted buildings: ``parts`` (footprints incl. rooftop structures; ``owner`` = id)
    and per-building columns (row 0 = none): eave ``height`` m, ``roof`` kind, ``colour``
    RGB, ``sar_db`` roof backscatter, ``zone``, ``area_m2``, centre ``rc`` px."""

    parts: Parts
    table: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.table["height"]) - 1


def _shape_parts(
    rng: np.random.Generator, r: np.ndarray, c: np.ndarray, length: np.ndarray, width: np.ndarray,
    angle: np.ndarray, kind: np.ndarray, owner: np.ndarray, height: np.ndarray, gable: np.ndarray,
    ridge: np.ndarray,
) -> Parts:
    """Parts of each building (px): kind 0 rectangle, 1 L-shape (main + wing), 2 courtyard
    ring (4 sides)."""
    du: list[np.ndarray] = []
    dv: list[np.ndarray] = []
    pl: list[np.ndarray] = []
    pw: list[np.ndarray] = []
    src: list[np.ndarray] = []
    n = len(r)
    alln = np.arange(n)
    # Main body (rectangles and L-shapes).
    m = kind != 2
    du.append(np.zeros(m.sum())), dv.append(np.zeros(m.sum())), pl.append(length[m]), pw.append(width[m]), src.append(alln[m])
    # L wing: attached at one end, extending to one side.
    m = kind == 1
    k = int(m.sum())
    wl = width[m] * rng.uniform(0.7, 1.0, k)  # along the main axis
    ww = width[m] * rng.uniform(0.8, 1.8, k)  # sticking out
    su, sv = rng.choice([-1.0, 1.0], k), rng.choice([-1.0, 1.0], k)
    du.append(su * (length[m] - wl) / 2), dv.append(sv * (width[m] + ww) / 2), pl.append(wl), pw.append(ww), src.append(alln[m])
    # Courtyard ring.
    m = kind == 2
    k = int(m.sum())
    t = np.minimum(rng.uniform(9.0, 13.0, k), width[m] / 3)
    t = np.minimum(t, length[m] / 3)
    L, W = length[m], width[m]
    for a, b, ln_, wd_ in (
        (0 * L, -(W - t) / 2, L, t), (0 * L, (W - t) / 2, L, t), (-(L - t) / 2, 0 * L, t, W - 2 * t), ((L - t) / 2, 0 * L, t, W - 2 * t),
    ):
        du.append(a), dv.append(b), pl.append(ln_), pw.append(wd_), src.append(alln[m])
    du_a, dv_a, pl_a, pw_a, s = (np.concatenate(x) for x in (du, dv, pl, pw, src))
    s = s.astype(np.intp)
    ca, sa = np.cos(angle[s]), np.sin(angle[s])
    return Parts(
        r=(r[s] + du_a * sa + dv_a * ca).astype(np.float32),
        c=(c[s] + du_a * ca - dv_a * sa).astype(np.float32),
        length=pl_a.astype(np.float32),
        width=pw_a.astype(np.float32),
        angle=angle[s].astype(np.float32),
        owner=owner[s].astype(np.int64),
        height=height[s].astype(np.float32),
        gable=gable[s].astype(np.uint8),
        ridge=ridge[s].astype(np.float32),
    )


def place_buildings(rng: np.random.Generator, layout: Layout, density_mult: float) -> Buildings:
    """Draw, fit, test and accept building candidates over the whole layout.

    Candidates are shrunk to fit the free space around them (distance to the nearest
    forbidden pixel at the centre and at both ends), so dense blocks fill up with a mix of
    sizes instead of rejecting every large candidate.
    """
    shape = layout.shape
    h, w = shape
    gsd = layout.gsd_m
    zone_px = layout.parcels["zone"][layout.parcel_id]
    ok_px = _BUILDABLE[layout.material] & (layout.canopy_h <= 0) & (layout.water_dist_m > 5.0) & (layout.edge_dist_m > 2.0)
    setback = np.zeros(16, np.float32)
    for z, spec in ZONE_SPECS.items():
        setback[z] = spec.setback_m
    ok_px &= layout.road_dist_m > setback[zone_px]
    flat_ok = ok_px.ravel()
    free_px = approx_distance(~ok_px).ravel()  # px to the nearest forbidden pixel

    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("r", "c", "L", "W", "angle", "kind", "h", "gable", "ridge", "gap", "zone", "pal")}
    for z, spec in ZONE_SPECS.items():
        pix = np.flatnonzero(flat_ok & (zone_px.ravel() == z))
        if pix.size == 0 or density_mult <= 0:
            continue
        n = int(rng.poisson(pix.size * gsd * gsd * spec.rate * density_mult * 3.0))
        if n == 0:
            continue
        at = rng.choice(pix, size=n, replace=True)
        r = (at // w).astype(np.float64) + rng.uniform(-0.5, 0.5, n)
        c = (at % w).astype(np.float64) + rng.uniform(-0.5, 0.5, n)
        L = rng.uniform(*spec.length, n) / gsd
        W = np.minimum(rng.uniform(*spec.width, n) / gsd, L)
        if z == DOWNTOWN:
            hgt = np.clip(rng.lognormal(np.log(20.0), 0.45, n), *spec.height)
        else:
            hgt = rng.uniform(*spec.height, n)
        tower = rng.random(n) < spec.tower_p
        L[tower] = W[tower] = rng.uniform(18.0, 34.0, int(tower.sum())) / gsd
        hgt[tower] = rng.uniform(50.0, 100.0, int(tower.sum()))
        # Street-aligned (long side along or across the street) with a small jitter.
        ang = layout.road_dir.ravel()[at] + rng.choice([0.0, np.pi / 2], n, p=[0.7, 0.3]) + rng.normal(0, 0.04, n)
        free = rng.random(n) < 0.12
        ang[free] = rng.uniform(0, np.pi, int(free.sum()))
        # Shrink to fit: width from the free radius at the centre, length from the ends.
        W = np.minimum(W, 2.0 * free_px[at] - 1.0)
        for _ in range(4):
            half = np.maximum(L / 2 - W / 2, 0.0)
            ends_ok = np.ones(n, bool)
            for sgn in (-1.0, 1.0):
                er = np.clip(np.round(r + sgn * half * np.sin(ang)), 0, h - 1).astype(np.int64)
                ec = np.clip(np.round(c + sgn * half * np.cos(ang)), 0, w - 1).astype(np.int64)
                ends_ok &= free_px[er * w + ec] >= W / 2
            L = np.where(ends_ok, L, np.maximum(W, 0.75 * L))
        keep = (W >= 0.7 * spec.width[0] / gsd) & (L >= 0.7 * spec.length[0] / gsd)
        kind = np.zeros(n, np.int64)
        u = rng.random(n)
        kind[u < spec.l_shape_p] = 1
        big = (L * gsd > 32) & (W * gsd > 28)
        kind[big & (u >= spec.l_shape_p) & (u < spec.l_shape_p + spec.court_p)] = 2
        kind[tower] = 0
        gable = (rng.random(n) < spec.gable_p) & ~tower
        ridge = np.where(gable, rng.uniform(0.25, 0.4, n) * W * gsd, 0.0)
        for k, v in (("r", r), ("c", c), ("L", L), ("W", W), ("angle", ang), ("kind", kind), ("h", hgt),
                     ("gable", gable), ("ridge", ridge), ("gap", np.full(n, spec.gap_m / gsd)), ("zone", np.full(n, z)),
                     ("pal", np.full(n, {"gable": 0, "flat": 1, "metal": 2}[spec.palette]))):
            cols[k].append(v[keep])
    if not cols["r"] or sum(len(x) for x in cols["r"]) == 0:
        return _empty_buildings()
    cand = {k: np.concatenate(v) for k, v in cols.items()}
    n = len(cand["r"])
    area = cand["L"] * cand["W"]
    # Big buildings first (they are the hardest to fit), with noise so sizes still mix.
    rank = np.empty(n, np.int64)
    rank[np.argsort(-area * rng.uniform(0.5, 1.5, n))] = np.arange(n)
    ids = np.arange(n)
    parts = _shape_parts(rng, cand["r"], cand["c"], cand["L"], cand["W"], cand["angle"], cand["kind"], ids,
                         cand["h"], cand["gable"], cand["ridge"])
    # Footprint test on a 1 px sampling (enough to catch forbidden ground and overlaps).
    pidx, flat, _ = raster_parts(parts, shape, step=1.0, heights=False)
    owner = parts.owner[pidx]
    bad = np.bincount(owner, weights=~flat_ok[flat], minlength=n) > 0
    expected = np.bincount(parts.owner, weights=np.maximum(1, np.ceil(parts.length)) * np.maximum(1, np.ceil(parts.width)), minlength=n)
    bad |= np.bincount(owner, minlength=n) < 0.98 * expected  # mostly outside the world
    # Spacing: footprints inflated by the zone's gap, accepted in rank order.
    pad_parts = parts.take(~bad[parts.owner])
    pad_parts.length = pad_parts.length + cand["gap"][pad_parts.owner].astype(np.float32)
    pad_parts.width = pad_parts.width + cand["gap"][pad_parts.owner].astype(np.float32)
    pp, pf, _ = raster_parts(pad_parts, shape, step=1.0, heights=False)
    po = pad_parts.owner[pp]
    del pp
    # Random sequential adsorption in rounds: each round accepts every candidate that wins
    # all its pixels among the active ones (lowest rank wins), then drops candidates that
    # touch an accepted footprint. A few rounds fill blocks nearly as densely as a
    # one-by-one placement, with whole-array operations only.
    ok = np.zeros(n, bool)
    active = ~bad
    taken = np.zeros(h * w, bool)
    big = np.iinfo(np.int64).max
    for _ in range(8):
        sel = active[po]
        if not sel.any():
            break
        f, o = pf[sel], po[sel]
        best = np.full(h * w, big, np.int64)
        np.minimum.at(best, f, rank[o])
        lost = np.bincount(o, weights=best[f] != rank[o], minlength=n) > 0
        win = active & ~lost
        ok |= win
        taken[f[win[o]]] = True
        active &= ~win
        sel = active[po]
        touch = np.bincount(po[sel], weights=taken[pf[sel]], minlength=n) > 0
        active &= ~touch
    acc = np.flatnonzero(ok)
    acc = acc[np.argsort(rank[acc])]
    new_id = np.zeros(n, np.int64)
    new_id[acc] = np.arange(1, len(acc) + 1)
    final = parts.take(ok[parts.owner])
    final.owner = new_id[final.owner]

    nb = len(acc)
    pal = cand["pal"][acc]
    colour_idx = np.empty(nb, np.int64)
    for k, name in enumerate(("gable", "flat", "metal")):
        m = pal == k
        colour_idx[m] = rng.choice(len(ROOF_COLOURS), int(m.sum()), p=_ROOF_P[name] / _ROOF_P[name].sum())
    colour = ROOF_COLOURS[colour_idx] * rng.uniform(0.85, 1.15, (nb, 1)).astype(np.float32)
    gable_b = cand["gable"][acc].astype(np.uint8)
    # Roof backscatter (VV dB at 35 deg): gravel/tar roofs rough, metal roofs specular-dark.
    sar_db = np.where(pal == 2, rng.uniform(-16, -11, nb), rng.uniform(-12.5, -7.0, nb)).astype(np.float32)
    area_m2 = (cand["L"][acc] * cand["W"][acc] * gsd * gsd).astype(np.float32)

    # Rooftop structures (lift shafts, HVAC) on large flat roofs: small boxes 1.5-4 m high.
    flat_big = np.flatnonzero((gable_b == 0) & (area_m2 > 350))
    if flat_big.size:
        nbox = rng.integers(1, 5, flat_big.size)
        bi = np.repeat(flat_big, nbox)
        src = acc[bi]
        k = len(bi)
        L, W = cand["L"][src], cand["W"][src]
        bl = np.minimum(rng.uniform(2.0, 7.0, k) / gsd, 0.3 * L)
        bw = np.minimum(rng.uniform(2.0, 6.0, k) / gsd, 0.3 * W)
        du = rng.uniform(-0.3, 0.3, k) * L
        dv = rng.uniform(-0.3, 0.3, k) * W
        a = cand["angle"][src]
        # Courtyard blocks have no roof in the middle: keep their boxes on the ring.
        court = cand["kind"][src] == 2
        dv[court] = np.sign(dv[court] + 1e-9) * (W[court] / 2 - 5.0 / gsd)
        boxes = Parts(
            r=(cand["r"][src] + du * np.sin(a) + dv * np.cos(a)).astype(np.float32),
            c=(cand["c"][src] + du * np.cos(a) - dv * np.sin(a)).astype(np.float32),
            length=bl.astype(np.float32), width=bw.astype(np.float32), angle=a.astype(np.float32),
            owner=(bi + 1).astype(np.int64), height=cand["h"][src].astype(np.float32),
            gable=np.zeros(k, np.uint8), ridge=rng.uniform(1.5, 4.0, k).astype(np.float32),
        )
        final = Parts.concat([final, boxes])

    table = {
        "height": np.concatenate([[0.0], cand["h"][acc]]).astype(np.float32),
        "roof": np.concatenate([[0], gable_b]).astype(np.uint8),
        "colour": np.vstack([np.zeros((1, 3), np.float32), colour]).astype(np.float32),
        "sar_db": np.concatenate([[0.0], sar_db]).astype(np.float32),
        "zone": np.concatenate([[0], cand["zone"][acc]]).astype(np.uint8),
        "area_m2": np.concatenate([[0.0], area_m2]).astype(np.float32),
        "rc": np.vstack([np.zeros((1, 2)), np.stack([cand["r"][acc], cand["c"][acc]], 1)]).astype(np.float32),
    }
    return Buildings(parts=final, table=table)


def _empty_buildings() -> Buildings:
    z = np.zeros(0, np.float32)
    parts = Parts(z, z, z, z, z, np.zeros(0, np.int64), z, np.zeros(0, np.uint8), z)
    table = {"height": np.zeros(1, np.float32), "roof": np.zeros(1, np.uint8), "colour": np.zeros((1, 3), np.float32),
             "sar_db": np.zeros(1, np.float32), "zone": np.zeros(1, np.uint8), "area_m2": np.zeros(1, np.float32),
             "rc": np.zeros((1, 2), np.float32)}
    return Buildings(parts=parts, table=table)


# --------------------------------------------------------------------------- trees


@dataclass
class Trees:
    """Individual trees: centre (row, col) px, crown radius px, height m, evergreen flag,
    colour jitter (3,) and an autumn hue choice."""

    r: np.ndarray
    c: np.ndarray
    radius: np.ndarray
    height: np.ndarray
    evergreen: np.ndarray
    jitter: np.ndarray
    hue: np.ndarray

    def __len__(self) -> int:
        return len(self.r)

    def take(self, keep: np.ndarray) -> "Trees":
        return Trees(*[getattr(self, f)[keep] for f in Trees.__dataclass_fields__])


def place_trees(rng: np.random.Generator, layout: Layout, occupied: np.ndarray) -> Trees:
    """Garden, park, street, farm and isolated field trees on free ground (not ``occupied``)."""
    shape = layout.shape
    w = shape[1]
    gsd = layout.gsd_m
    zone_px = layout.parcels["zone"][layout.parcel_id].ravel()
    free = (~occupied & (layout.canopy_h <= 0) & (layout.water_dist_m > 2.0)).ravel()
    mat = layout.material.ravel()
    soft = free & np.isin(mat, (GRASS, SOIL, GRAVEL))
    per_px = np.zeros(zone_px.shape, np.float32)  # expected trees per pixel
    a = gsd * gsd
    rates = {HOUSES: 1 / 240, APARTMENTS: 1 / 400, DOWNTOWN: 1 / 400, PARK: 1 / 700, FARM: 1 / 600, MEADOW: 1 / 5000,
             FIELD: 1 / 20000, FALLOW: 1 / 8000, INDUSTRIAL: 1 / 3000}
    for z, rate in rates.items():
        per_px[(zone_px == z) & soft] = rate * a
    fields_ok = free & (mat == CROP) & np.isin(zone_px, (FIELD, FARM))  # CROP material: isolated field trees
    per_px[fields_ok] = a / 20000
    # Street verges: one tree per ~9 m of street on a 1.5 m band.
    per_px[layout.street_side.ravel() & free] = a / (9.0 * 1.5)
    pick = np.flatnonzero(rng.random(per_px.size) < per_px)
    # Park clumps: clusters of 3-12 trees around random park points.
    park = np.flatnonzero((zone_px == PARK) & soft)
    clumps = []
    if park.size:
        nc = int(rng.poisson(park.size * a / 2500))
        if nc:
            centres = rng.choice(park, nc)
            k = rng.integers(3, 13, nc)
            cc = np.repeat(centres, k)
            rr = cc // w + np.round(rng.normal(0, 7.0 / gsd, cc.size)).astype(np.int64)
            cl = cc % w + np.round(rng.normal(0, 7.0 / gsd, cc.size)).astype(np.int64)
            inb = (rr >= 0) & (rr < shape[0]) & (cl >= 0) & (cl < w)
            flat = rr[inb] * w + cl[inb]
            clumps.append(flat[free[flat]])
    allp = np.concatenate([pick] + clumps) if clumps else pick
    n = allp.size
    radius_m = rng.uniform(2.0, 4.8, n)
    radius_m[zone_px[allp] == PARK] *= 1.2
    height = radius_m * rng.uniform(1.8, 3.2, n) + 2.0
    return Trees(
        r=(allp // w + rng.uniform(-0.5, 0.5, n)).astype(np.float32),
        c=(allp % w + rng.uniform(-0.5, 0.5, n)).astype(np.float32),
        radius=(radius_m / gsd).astype(np.float32),
        height=height.astype(np.float32),
        evergreen=rng.random(n) < 0.25,
        jitter=rng.uniform(0.8, 1.2, (n, 3)).astype(np.float32),
        hue=rng.integers(0, 3, n).astype(np.uint8),
    )


def raster_trees(trees: Trees, shape: tuple[int, int], ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Crowns as domes: returns (canopy height m (H, W), tree id (H, W), 1-based, 0 none).
    ``ids`` gives each tree's id (default 1..N)."""
    h, w = shape
    ids = np.arange(1, len(trees) + 1) if ids is None else ids
    flats, zs, owners = [], [], []
    rad_px = np.maximum(1, np.ceil(trees.radius)).astype(np.int64)
    for R in np.unique(rad_px):
        sel = np.flatnonzero(rad_px == R)
        dy, dx = np.mgrid[-R : R + 1, -R : R + 1]
        d = np.hypot(dy, dx).ravel()
        dy, dx = dy.ravel(), dx.ravel()
        r_c = np.round(trees.r[sel]).astype(np.int64)[:, None] + dy[None]
        c_c = np.round(trees.c[sel]).astype(np.int64)[:, None] + dx[None]
        rel = d[None] / np.maximum(trees.radius[sel], 0.5)[:, None]
        inside = (rel <= 1.0) & (r_c >= 0) & (r_c < h) & (c_c >= 0) & (c_c < w)
        z = trees.height[sel][:, None] * (0.72 + 0.28 * np.sqrt(np.clip(1.0 - rel**2, 0.0, 1.0)))
        flats.append((r_c * w + c_c)[inside])
        zs.append(z[inside])
        owners.append(np.broadcast_to(ids[sel][:, None], inside.shape)[inside])
    if not flats:
        return np.zeros(shape, np.float32), np.zeros(shape, np.int32)
    return stamp_max(shape, np.concatenate(flats), np.concatenate(zs).astype(np.float32), np.concatenate(owners))


# --------------------------------------------------------------------------- vehicles


def _parking_lots(rng: np.random.Generator, layout: Layout, free_asphalt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cars in parking lots: double rows (2 x 5 m bays, 6.5 m aisle, 2.6 m wide bays) on a
    grid aligned with the lot, 40-90 % occupied. Returns (row px, col px, car angle)."""
    h, w = layout.shape
    gsd = layout.gsd_m
    zones = layout.parcels["zone"]
    seeds = layout.parcels["seed_rc"]
    out_r, out_c, out_a = [], [], []
    for pid in np.flatnonzero(zones == PARKING):
        r0, c0 = seeds[pid]
        ri, ci = int(np.clip(r0, 0, h - 1)), int(np.clip(c0, 0, w - 1))
        a = float(layout.road_dir[ri, ci])
        half = 90.0 / gsd
        u = np.arange(-half, half, 2.6 / gsd)
        period = 16.5 / gsd
        v = np.concatenate([np.arange(-half, half, period) + off / gsd for off in (2.5, 7.5)])
        uu, vv = np.meshgrid(u, v)
        rr = r0 + uu * np.sin(a) + vv * np.cos(a)
        cc = c0 + uu * np.cos(a) - vv * np.sin(a)
        rk, ck = np.round(rr).astype(np.int64), np.round(cc).astype(np.int64)
        inb = (rk >= 0) & (rk < h) & (ck >= 0) & (ck < w)
        rk, ck, rr, cc = rk[inb], ck[inb], rr[inb], cc[inb]
        on = (layout.parcel_id[rk, ck] == pid) & free_asphalt[rk, ck] & (layout.road_dist_m[rk, ck] > 2.5)
        on &= rng.random(on.size) < rng.uniform(0.4, 0.9)
        out_r.append(rr[on]), out_c.append(cc[on]), out_a.append(np.full(int(on.sum()), a + np.pi / 2))
    if not out_r:
        z = np.zeros(0)
        return z, z, z
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_a)


def place_vehicles(rng: np.random.Generator, layout: Layout, occupied: np.ndarray, river_axis: list[np.ndarray]) -> tuple[Parts, np.ndarray, np.ndarray]:
    """Cars on streets and in parking lots, ships on the river, for one acquisition.

    Returns (parts with owner = vehicle id, colour (N+1, 3), kind (N+1,) 1 car / 2 ship).
    """
    shape = layout.shape
    h, w = shape
    gsd = layout.gsd_m
    zone_px = layout.parcels["zone"][layout.parcel_id].ravel()
    mat = layout.material.ravel()
    free = ~occupied.ravel()
    asphalt = (mat == ASPHALT) & free
    per_px = np.zeros(mat.shape, np.float32)
    a = gsd * gsd
    urban_street = asphalt & ~layout.arterial.ravel() & np.isin(zone_px, (HOUSES, APARTMENTS, DOWNTOWN, INDUSTRIAL, PARK, BUILDSITE))
    per_px[urban_street] = a / 350.0
    per_px[asphalt & layout.arterial.ravel() & (layout.ground_h.ravel() == 0)] = a / 450.0
    per_px[asphalt & (zone_px == APARTMENTS) & ~urban_street] = a / 60.0
    at = np.flatnonzero(rng.random(per_px.size) < per_px)
    ang = layout.road_dir.ravel()[at].astype(np.float64)
    lot_r, lot_c, lot_a = _parking_lots(rng, layout, asphalt.reshape(shape))
    r_all = np.concatenate([at // w, lot_r]).astype(np.float32)
    c_all = np.concatenate([at % w, lot_c]).astype(np.float32)
    ang = np.concatenate([ang, lot_a])
    n = r_all.size
    cars = Parts(
        r=r_all, c=c_all,
        length=np.full(n, 4.4 / gsd, np.float32), width=np.full(n, 1.8 / gsd, np.float32),
        angle=ang.astype(np.float32), owner=np.arange(1, n + 1, dtype=np.int64),
        height=rng.uniform(1.4, 1.9, n).astype(np.float32), gable=np.zeros(n, np.uint8), ridge=np.zeros(n, np.float32),
    )
    car_col = CAR_COLOURS[rng.choice(len(CAR_COLOURS), n, p=_CAR_P)]
    # Ships along the river axis, oriented with it.
    ships_r, ships_c, ships_a, ships_l = [], [], [], []
    for centre in river_axis:
        k = int(rng.poisson(w * gsd / 300.0))
        xs = rng.uniform(0, w - 1, k)
        xi = xs.astype(np.int64)
        slope = np.gradient(centre)[xi]
        ys = centre[xi] + rng.uniform(-8.0, 8.0, k) / gsd
        ships_r.append(ys), ships_c.append(xs), ships_a.append(np.arctan(slope)), ships_l.append(rng.uniform(18.0, 65.0, k))
    sr, sc, sa, sl = (np.concatenate(x) if x else np.zeros(0) for x in (ships_r, ships_c, ships_a, ships_l))
    ns = sr.size
    ships = Parts(
        r=sr.astype(np.float32), c=sc.astype(np.float32), length=(sl / gsd).astype(np.float32),
        width=(sl * rng.uniform(0.16, 0.22, ns) / gsd).astype(np.float32), angle=sa.astype(np.float32),
        owner=np.arange(n + 1, n + ns + 1, dtype=np.int64), height=rng.uniform(3.0, 8.0, ns).astype(np.float32),
        gable=np.zeros(ns, np.uint8), ridge=np.zeros(ns, np.float32),
    )
    ship_col = np.array([[0.7, 0.7, 0.68], [0.5, 0.12, 0.08], [0.15, 0.15, 0.17]], np.float32)[rng.integers(0, 3, ns)]
    # Keep ships entirely on water.
    if ns:
        pidx, flat, _ = raster_parts(ships, shape)
        dry = np.bincount(pidx, weights=(mat[flat] != WATER), minlength=ns) > 0
        inb = np.bincount(pidx, minlength=ns) > 0
        # No two ships on the same water: the first drawn keeps a contested pixel.
        first = np.full(h * w, ns, np.int64)
        np.minimum.at(first, flat, pidx)
        hit = np.bincount(pidx, weights=first[flat] != pidx, minlength=ns) > 0
        keep = ~dry & inb & ~hit
        ships = ships.take(keep)
        ship_col = ship_col[keep]
        ships.owner = np.arange(n + 1, n + 1 + int(keep.sum()), dtype=np.int64)
    parts = Parts.concat([cars, ships])
    colour = np.vstack([np.zeros((1, 3), np.float32), car_col, ship_col]).astype(np.float32)
    kind = np.concatenate([[0], np.ones(n), np.full(len(ships.r), 2)]).astype(np.uint8)
    return parts, colour, kind
