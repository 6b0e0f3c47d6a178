"""SAR rendering in ground range for a side-looking sensor.

Geometry (flat Earth, plane wave, constant incidence ``theta`` over the scene): the sensor
looks along ``look`` ("east" = the radar looks east, the sensor sits to the west). The
scene is rotated so that range increases along +column, every range line (row) is
rendered independently, and the result is rotated back.

- Layover: a scatterer at ground-range position ``x`` and height ``z`` has slant range
  ``x sin(theta) - z cos(theta)``; projected to ground range it appears at
  ``x - z / tan(theta)``, i.e. displaced TOWARD the sensor by ``z / tan(theta)``. Every
  pixel's return is scattered to its displaced position (``np.bincount`` with linear
  weights), so foreshortening of slopes and the summing of roof, wall and ground returns in
  the layover band come out of the projection itself.
- Radar shadow: a point is hidden when something between it and the sensor rises above
  the ray, i.e. when ``max over x0 < x of (z(x0) + x0 / tan(theta))`` exceeds
  ``z(x) + x / tan(theta)`` (one running maximum per row). Behind a building of height h
  the shadow is ``h tan(theta)`` long, on the side AWAY from the sensor.
- Walls facing the sensor return a single bounce spread over their layover band, and a
  double bounce (wall + ground dihedral) at the wall foot, which is not displaced: a bright
  line along the building's sensor-side edge, strongest when the wall faces the sensor
  squarely (cardinal effect), with cross-pol growing as the wall turns (sin^2 2phi).
- Materials: surface (Bragg-like, falls with local incidence), volume (vegetation, strong
  in cross-pol), dark specular water (wind-modulated), bright point targets.
- Speckle: multiplicative Gamma with shape L and mean 1 (variance 1/L) on intensity, after
  adding thermal noise (NESZ); dB = 10 log10(intensity).

Bands: 1 = VV; 2 = VV, VH; 4 = HH, HV, VH, VV (HV = VH, reciprocity: same speckle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cmpc.data.synth.noise import smooth_noise
from cmpc.data.synth.scene import (
    ASPHALT, CONCRETE, CONSTRUCTION, CROP, GRASS, GRAVEL, ROOF, SOIL, TREE, VEHICLE, WATER, Scene,
)

BANDS = {1: ("VV",), 2: ("VV", "VH"), 4: ("HH", "HV", "VH", "VV")}
LOOK_DIRECTIONS = ("east", "west", "north", "south")
NESZ_DB = -25.0

# VV backscatter (dB, per unit ground area at 35 deg) and the share of volume scattering.
_VV_DB = np.array([-12.0, -11.0, -8.5, -19.0, -14.5, -10.0, -21.0, -7.5, -10.0, -12.5, -3.0], np.float32)
_VOLUME = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.6, 0.45, 0.0], np.float32)
# Surface roughness exponent n of sigma0 ~ cos(local incidence)^n (water: steep Bragg fall-off).
_COS_N = np.array([2.5, 2.5, 2.0, 3.0, 3.0, 2.0, 6.0, 1.0, 1.5, 2.0, 1.0], np.float32)
# Amplitude (dB) of the fine texture of natural surfaces.
_TEXTURE_DB = np.array([0.5, 0.5, 0.8, 0.0, 0.0, 0.0, 0.0, 2.0, 0.7, 0.7, 0.0], np.float32)
# Crops (wheat, maize, rapeseed, beet, ploughed, hay): VV offset from the crop mean, dB.
_CROP_DB = np.array([-2.5, 2.5, 1.5, 0.0, 1.0, -3.5], np.float32)
# Smoothness of the ground in front of a wall: weight of the specular ground bounce.
_MIRROR = np.array([0.5, 0.5, 0.4, 0.9, 0.85, 0.6, 1.0, 0.0, 0.3, 0.4, 0.5], np.float32)

# Channel ratios relative to VV (dB) per mechanism.
_RATIO_DB = {
    "surface": {"HH": -1.5, "HV": -14.0, "VH": -14.0, "VV": 0.0},
    "water": {"HH": -5.0, "HV": -24.0, "VH": -24.0, "VV": 0.0},
    "volume": {"HH": 0.3, "HV": -6.5, "VH": -6.5, "VV": 0.0},
    "double": {"HH": 3.5, "HV": -18.0, "VH": -18.0, "VV": 0.0},
    "point": {"HH": 0.0, "HV": -9.0, "VH": -9.0, "VV": 0.0},
}


@dataclass
class SarGeometry:
    """Side-looking geometry: incidence at scene centre (degrees), look direction, pixel size
    (metres, ground range = azimuth spacing)."""

    incidence_deg: float = 35.0
    look: str = "east"
    gsd_m: float = 1.0

    @property
    def sensor_side(self) -> str:
        return {"east": "west", "west": "east", "north": "south", "south": "north"}[self.look]


# --------------------------------------------------------------------------- frame helpers


def to_range_frame(a: np.ndarray, look: str) -> np.ndarray:
    """Rotate/flip the last two axes so that ground range increases along +column."""
    if look == "east":
        return a
    if look == "west":
        return a[..., ::-1]
    if look == "north":
        return np.rot90(a, k=-1, axes=(-2, -1))
    if look == "south":
        return np.rot90(a, k=1, axes=(-2, -1))
    raise ValueError(f"unknown look direction {look!r}; valid: {LOOK_DIRECTIONS}")


def from_range_frame(a: np.ndarray, look: str) -> np.ndarray:
    """Inverse of :func:`to_range_frame`."""
    if look == "east":
        return a
    if look == "west":
        return a[..., ::-1]
    if look == "north":
        return np.rot90(a, k=1, axes=(-2, -1))
    if look == "south":
        return np.rot90(a, k=-1, axes=(-2, -1))
    raise ValueError(f"unknown look direction {look!r}; valid: {LOOK_DIRECTIONS}")


def points_to_range_frame(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], look: str) -> tuple[np.ndarray, np.ndarray]:
    """Map (row, col) pixel positions of the world grid into the range frame."""
    h, w = shape
    if look == "east":
        return rows, cols
    if look == "west":
        return rows, (w - 1) - cols
    if look == "north":
        return cols, (h - 1) - rows
    if look == "south":
        return (w - 1) - cols, rows
    raise ValueError(f"unknown look direction {look!r}; valid: {LOOK_DIRECTIONS}")


# --------------------------------------------------------------------------- geometry


def radar_shadow(dsm: np.ndarray, gsd_m: float, incidence_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Radar shadow in the range frame (sensor at -column).

    Returns ``(shadow (H, W) bool, horizon (H, W) float32)`` where ``horizon[r, x]`` is the
    running maximum of ``z + x * gsd / tan(theta)`` over columns < x (metres).
    """
    k = gsd_m / np.tan(np.radians(incidence_deg))
    g = dsm + np.arange(dsm.shape[1], dtype=np.float32)[None, :] * np.float32(k)
    horizon = np.empty_like(g)
    horizon[:, 0] = -np.inf
    horizon[:, 1:] = np.maximum.accumulate(g, axis=1)[:, :-1]
    # A tolerance of a few cm keeps flat ground (and smooth slopes) out of shadow.
    return horizon > g + 0.05, horizon


def project_ground_range(
    values: np.ndarray, height_m: np.ndarray, gsd_m: float, incidence_deg: float
) -> np.ndarray:
    """Scatter (..., H, W) returns located at ground pixels with heights (H, W) to their layover
    position ``x - z / (tan(theta) gsd)`` (linear split between the two nearest pixels)."""
    h, w = height_m.shape
    shift = height_m / (np.tan(np.radians(incidence_deg)) * gsd_m)
    xp = np.arange(w, dtype=np.float32)[None, :] - shift
    x0 = np.floor(xp)
    f = (xp - x0).astype(np.float32)
    x0 = x0.astype(np.int64)
    rows = np.arange(h, dtype=np.int64)[:, None] * (w + 2)
    # Columns are offset by one into a (W + 2)-wide buffer so x0 = -1 and x0 + 1 = W stay in.
    i0 = (rows + np.clip(x0 + 1, 0, w + 1)).ravel()
    i1 = (rows + np.clip(x0 + 2, 0, w + 1)).ravel()
    lead = values.shape[:-2]
    flat_vals = values.reshape(-1, h * w)
    out = np.empty((flat_vals.shape[0], h, w), np.float32)
    wf = f.ravel()
    for b in range(flat_vals.shape[0]):
        v = flat_vals[b]
        acc = np.bincount(i0, weights=v * (1.0 - wf), minlength=h * (w + 2))
        acc += np.bincount(i1, weights=v * wf, minlength=h * (w + 2))
        out[b] = acc.reshape(h, w + 2)[:, 1:-1]
    return out.reshape(*lead, h, w)


def _local_incidence_cos(dsm: np.ndarray, gsd_m: float, incidence_deg: float) -> np.ndarray:
    """cos(local incidence) / cos(theta) for smooth surfaces (walls and crown edges excluded)."""
    th = np.radians(incidence_deg)
    gy, gx = np.gradient(dsm, gsd_m)
    wall = (np.abs(gx) > 1.2) | (np.abs(gy) > 1.2)
    gx[wall] = 0.0
    gy[wall] = 0.0
    cos_l = (np.sin(th) * gx + np.cos(th)) / np.sqrt(1.0 + gx * gx + gy * gy)
    return np.clip(cos_l / np.cos(th), 0.0, 4.0).astype(np.float32)


# --------------------------------------------------------------------------- rendering


def reflectivity(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel VV sigma0 (linear, nominal incidence) split into (surface, water, volume)."""
    h, w = scene.shape
    gsd = scene.gsd_m
    mat = scene.material
    db = _VV_DB[mat].copy()
    pid = scene.parcel_id
    par = scene.parcels
    # Parcel moisture/roughness: partly shared with the optical tone (same crop and soil),
    # partly new (a different day).
    p_noise = rng.normal(0.0, 1.0, len(par["tone"])).astype(np.float32)
    p_db = 1.8 * par["tone"] + 0.8 * p_noise
    for m in (SOIL, GRASS, CROP, GRAVEL, CONSTRUCTION, CONCRETE, ASPHALT):
        sel = mat == m
        db[sel] += p_db[pid[sel]]
    sel = mat == CROP
    db[sel] += _CROP_DB[par["crop"][pid[sel]]]
    sel = mat == ROOF
    db[sel] = scene.buildings["sar_db"][scene.building_id[sel]]
    sel = mat == WATER
    # Wind roughening of the water surface: slow +-3 dB variations.
    db[sel] += 3.0 * smooth_noise(rng, (h, w), 80.0 / gsd)[sel]
    # Texture of natural distributed targets (before speckle): crowns, crop rows, clods.
    # Paved surfaces, roofs and water stay homogeneous (pure speckle).
    db += _TEXTURE_DB[mat] * smooth_noise(rng, (h, w), 1.2 / gsd if gsd < 1.0 else 0.6)
    sigma = (10.0 ** (db / 10.0)).astype(np.float32)
    vol = sigma * _VOLUME[mat]
    water = np.where(mat == WATER, sigma, 0.0).astype(np.float32)
    surf = sigma - vol - water
    return surf, water, vol


def render_sar_mean(
    scene: Scene, geometry: SarGeometry, polarisations: int, rng: np.random.Generator
) -> np.ndarray:
    """Speckle-free SAR intensity, (P, H, W) float32 linear, bands as in :data:`BANDS`.

    Includes thermal noise (NESZ); radar shadow receives only noise and other objects'
    layover.
    """
    if polarisations not in BANDS:
        raise ValueError(f"polarisations must be one of {sorted(BANDS)}")
    gsd = scene.gsd_m
    theta = geometry.incidence_deg
    look = geometry.look
    tan_t = np.tan(np.radians(theta))

    surf, water, vol = reflectivity(scene, rng)
    # Into the range frame (sensor at -column).
    dsm = np.ascontiguousarray(to_range_frame(scene.dsm, look))
    mat = np.ascontiguousarray(to_range_frame(scene.material, look))
    surf, water, vol = (np.ascontiguousarray(to_range_frame(a, look)) for a in (surf, water, vol))
    h, w = dsm.shape

    # Buildings, vehicles and bridges block the radar; tree crowns only attenuate it
    # (two-way canopy loss ~ -5 dB), so shadows of trees are grey, not black.
    # Volume returns come from within the canopy: their phase centre is a smoothed
    # 0.8 x canopy height (projecting every crown bump on its own folds a forest into
    # streaks), and the same smooth canopy casts the (partial) canopy shadow.
    is_tree = (mat == TREE).astype(np.float32)
    size = max(3, int(round(24.0 / gsd)) | 1)
    mean_h = ndi.uniform_filter(dsm * is_tree, size) / np.maximum(ndi.uniform_filter(is_tree, size), 1e-3)
    height = np.where(is_tree > 0, 0.8 * mean_h, dsm).astype(np.float32)
    shadow_hard, horizon = radar_shadow(np.where(is_tree > 0, 0.0, dsm).astype(np.float32), gsd, theta)
    shadow_all, _ = radar_shadow(height, gsd, theta)
    lit = np.where(shadow_hard, 0.0, np.where(shadow_all, 0.3, 1.0)).astype(np.float32)
    inc = _local_incidence_cos(dsm, gsd, theta)
    cos_n = _COS_N[mat]
    surf = surf * inc**cos_n * lit
    water = water * inc ** _COS_N[WATER] * lit
    vol = vol * lit  # volume scattering hardly depends on the local slope

    # ---- walls facing the sensor: z jumps up going away from the sensor, on hard targets
    hard = (mat == ROOF) | (mat == VEHICLE) | ((mat == ASPHALT) & (dsm > 0.5))
    dz = np.zeros_like(dsm)
    dz[:, 1:] = dsm[:, 1:] - dsm[:, :-1]
    wall = (dz > 0.8) & hard
    wall[:, 0] = False
    wr, wx = np.nonzero(wall)
    wall_single = np.zeros((h, w + 1), np.float32)
    dbl = np.zeros((h, w), np.float32)
    dbl_x = np.zeros((h, w), np.float32)
    if wr.size:
        top = dsm[wr, wx]
        bottom = dsm[wr, wx - 1]
        xw = wx - 0.5
        # Lowest visible point of the wall face (the horizon over columns <= x - 1).
        z0 = np.maximum(bottom, horizon[wr, wx] - xw * gsd / tan_t)
        visible = z0 < top
        # Wall orientation from the footprint outline: phi = angle between the wall's outward
        # normal and the direction to the sensor.
        footprint = ndi.gaussian_filter((dsm > 0.8).astype(np.float32), 1.5)
        gy, gx = np.gradient(footprint)
        nx, ny = -gx[wr, wx], -gy[wr, wx]
        norm = np.hypot(nx, ny) + 1e-9
        cos_phi = np.clip(-nx / norm, 0.0, 1.0)
        sin2phi = 2.0 * cos_phi * np.sqrt(np.clip(1.0 - cos_phi**2, 0.0, 1.0))
        # Single bounce on the wall face, spread over the wall's layover band.
        val = (10.0 ** (-9.0 / 10.0)) * tan_t * cos_phi * visible
        start = np.clip(np.floor(xw - top / (tan_t * gsd)), 0, w).astype(np.int64)
        end = np.clip(np.floor(xw - z0 / (tan_t * gsd)) + 1, 0, w).astype(np.int64)
        np.add.at(wall_single, (wr, start), val)
        np.add.at(wall_single, (wr, end), -val)
        # Double bounce at the wall foot (only where the foot itself is seen).
        foot_seen = z0 <= bottom + 0.25
        height_seen = np.minimum(top - bottom, 15.0)
        mirror = _MIRROR[mat[wr, wx - 1]]
        strength = 6.0 * (0.06 + 0.94 * cos_phi**12) * mirror * (height_seen / 10.0) * foot_seen
        np.add.at(dbl, (wr, wx - 1), strength)
        np.add.at(dbl_x, (wr, wx - 1), strength * (0.015 + 0.35 * sin2phi**2))
    wall_img = np.cumsum(wall_single, axis=1)[:, :w]

    # ---- project distributed returns to their layover positions
    names = BANDS[polarisations]
    unique = [n for n in names if n != "VH" or "HV" not in names]
    combos = []
    for name in unique:
        r = {k: np.float32(10.0 ** (v[name] / 10.0)) for k, v in _RATIO_DB.items()}
        combos.append(r["surface"] * surf + r["water"] * water + r["volume"] * vol)
    proj = dict(zip(unique, project_ground_range(np.stack(combos), height, gsd, theta)))
    del combos

    # ---- point targets
    pts_img = np.zeros((h, w), np.float32)
    pts = scene.points
    if len(pts):
        pr, pc = points_to_range_frame(pts[:, 0], pts[:, 1], scene.shape, look)
        ri = np.round(pr).astype(np.int64)
        ci = np.round(pc).astype(np.int64)
        ok = (ri >= 0) & (ri < h) & (ci >= 0) & (ci < w)
        ri, ci, z, s_db = ri[ok], ci[ok], pts[ok, 2], pts[ok, 3]
        seen = z + ci * gsd / tan_t >= horizon[ri, ci] - 0.05
        xi = np.round(ci - z / (tan_t * gsd)).astype(np.int64)
        ok = seen & (xi >= 0) & (xi < w)
        np.add.at(pts_img, (ri[ok], xi[ok]), (10.0 ** (s_db[ok] / 10.0)).astype(np.float32))

    nesz = np.float32(10.0 ** (NESZ_DB / 10.0))
    bands = []
    for name in names:
        r = {k: np.float32(10.0 ** (v[name] / 10.0)) for k, v in _RATIO_DB.items()}
        cross = name in ("HV", "VH")
        img = (
            proj["HV" if name == "VH" and "HV" in proj else name]
            + r["surface"] * wall_img
            + (dbl_x if cross else r["double"] * dbl)
            + r["point"] * pts_img
            + nesz
        )
        bands.append(img)
    mean = np.stack(bands).astype(np.float32)
    return np.ascontiguousarray(from_range_frame(mean, look))


def misregister(image: np.ndarray, shift_rc_px: tuple[float, float]) -> np.ndarray:
    """Shift (P, H, W) content by (rows, cols) pixels (bilinear; edges repeat)."""
    if shift_rc_px == (0.0, 0.0):
        return image
    return np.stack([ndi.shift(b, shift_rc_px, order=1, mode="nearest") for b in image]).astype(np.float32)


def speckle(mean: np.ndarray, looks: int, rng: np.random.Generator, bands: tuple[str, ...] | None = None) -> np.ndarray:
    """Multiplicative Gamma speckle: intensity * G, G ~ Gamma(shape=L, scale=1/L) (mean 1,
    variance 1/L). HV and VH share one realisation (reciprocity)."""
    out = np.empty_like(mean)
    cache: dict[str, np.ndarray] = {}
    for b in range(mean.shape[0]):
        name = bands[b] if bands else str(b)
        key = "X" if name in ("HV", "VH") else name
        if key not in cache:
            cache[key] = rng.gamma(float(looks), 1.0 / float(looks), mean.shape[1:]).astype(np.float32)
        out[b] = mean[b] * cache[key]
    return out


def to_db(intensity: np.ndarray, floor_db: float = -40.0) -> np.ndarray:
    """10 log10(intensity), clipped below at ``floor_db``; float32."""
    return (10.0 * np.log10(np.maximum(intensity, np.float32(10.0 ** (floor_db / 10.0))))).astype(np.float32)
