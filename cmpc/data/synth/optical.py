"""Optical rendering: RGB reflectance -> sun shading and cast shadows -> haze, clouds -> 8 bit.

- albedo per material, varied per object (roof colour per building, crop and tone per
  parcel, colour per tree and car) and textured (fine and medium-scale noise, crop rows);
- season sets the colour of grass, crops and trees (autumn hues, bare winter crowns,
  evergreens stay green);
- Lambertian shading of roof and canopy slopes from the DSM, and cast shadows: a pixel is
  in shadow when the DSM, walked from it toward the sun (azimuth clockwise from north),
  rises above the sun ray (``height + distance * tan(elevation)``); shadows fall away from
  the sun and are ``h / tan(elevation)`` long;
- haze (an additive path radiance, slowly varying) and optional clouds with their shadows.
"""

from __future__ import annotations

import numpy as np

from cmpc.data.synth.noise import fractal_noise, smooth_noise
from cmpc.data.synth.scene import (
    ASPHALT, CONCRETE, CONSTRUCTION, CROP, GRASS, GRAVEL, ROOF, SOIL, TREE, VEHICLE, WATER, Scene,
)

SEASONS = ("spring", "summer", "autumn", "winter")
_SEASON = {s: i for i, s in enumerate(SEASONS)}

# Linear reflectance (R, G, B) per material; seasonal materials are overwritten below.
_BASE = np.array(
    [
        [0.30, 0.23, 0.16],  # soil
        [0.42, 0.39, 0.33],  # gravel
        [0.47, 0.42, 0.34],  # construction
        [0.12, 0.12, 0.13],  # asphalt
        [0.36, 0.35, 0.33],  # concrete
        [0.40, 0.40, 0.40],  # roof (per building)
        [0.035, 0.06, 0.075],  # water
        [0.07, 0.14, 0.05],  # tree (per season)
        [0.20, 0.25, 0.10],  # crop (per crop and season)
        [0.14, 0.24, 0.08],  # grass (per season)
        [0.50, 0.50, 0.50],  # vehicle (per vehicle)
    ],
    dtype=np.float32,
)
# Texture amplitude per material (fine, ~1-2 m grain).
_GRAIN = np.array([0.12, 0.10, 0.16, 0.05, 0.06, 0.05, 0.03, 0.22, 0.07, 0.10, 0.02], np.float32)

_GRASS = np.array([[0.16, 0.30, 0.09], [0.13, 0.23, 0.08], [0.20, 0.22, 0.10], [0.24, 0.23, 0.17]], np.float32)
_TREE = np.array([[0.10, 0.20, 0.06], [0.06, 0.13, 0.045], [0.0, 0.0, 0.0], [0.17, 0.14, 0.11]], np.float32)
_AUTUMN = np.array([[0.30, 0.16, 0.05], [0.30, 0.26, 0.07], [0.10, 0.14, 0.05]], np.float32)
_EVERGREEN = np.array([0.05, 0.10, 0.05], np.float32)
# Crops (wheat, maize, rapeseed, beet, ploughed, hay) x season.
_CROP = np.array(
    [
        [[0.14, 0.28, 0.08], [0.10, 0.18, 0.07], [0.30, 0.22, 0.14], [0.20, 0.24, 0.12], [0.30, 0.22, 0.15], [0.17, 0.28, 0.09]],
        [[0.40, 0.34, 0.16], [0.08, 0.18, 0.05], [0.22, 0.26, 0.08], [0.09, 0.20, 0.06], [0.33, 0.25, 0.17], [0.30, 0.30, 0.15]],
        [[0.36, 0.28, 0.17], [0.30, 0.26, 0.12], [0.12, 0.20, 0.08], [0.12, 0.19, 0.07], [0.26, 0.19, 0.13], [0.22, 0.24, 0.12]],
        [[0.16, 0.22, 0.10], [0.30, 0.24, 0.16], [0.12, 0.20, 0.09], [0.28, 0.22, 0.15], [0.27, 0.20, 0.14], [0.22, 0.22, 0.15]],
    ],
    dtype=np.float32,
)
_HAZE = np.array([0.55, 0.60, 0.70], np.float32)
_SKY = np.array([0.85, 0.92, 1.10], np.float32)  # skylight in shadows is bluish


def sun_vector(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Unit vector toward the sun in (east, north, up)."""
    a, e = np.radians(azimuth_deg), np.radians(elevation_deg)
    return np.array([np.sin(a) * np.cos(e), np.cos(a) * np.cos(e), np.sin(e)])


def cast_shadow(dsm: np.ndarray, gsd_m: float, azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Boolean (H, W): pixels that cannot see the sun.

    The DSM is resampled on a grid rotated so that the sun shines along +j; a pixel at j
    is shaded when some pixel toward the sun, ``t`` metres away, is higher than
    ``z + t tan(elevation)``, i.e. when the running maximum of ``z + j gsd tan(e)`` before
    it exceeds its own value. The mask is sampled back onto the world grid (nearest).
    Cost: two resamplings and one running maximum, whatever the sun elevation.
    """
    h, w = dsm.shape
    a = np.radians(azimuth_deg)
    # Unit vectors in (row, col): along the light (away from the sun) and across it.
    along = np.array([np.cos(a), -np.sin(a)])
    across = np.array([np.sin(a), np.cos(a)])
    ctr = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    # Extent of the rotated grid: the projections of the four corners.
    corners = np.array([[0, 0], [0, w - 1], [h - 1, 0], [h - 1, w - 1]], float) - ctr
    j_lo, j_hi = np.floor((corners @ along).min()), np.ceil((corners @ along).max())
    i_lo, i_hi = np.floor((corners @ across).min()), np.ceil((corners @ across).max())
    jj = np.arange(j_lo, j_hi + 1, dtype=np.float32)
    ii = np.arange(i_lo, i_hi + 1, dtype=np.float32)
    # Nearest-neighbour resampling by direct indexing (much faster than map_coordinates);
    # out-of-world samples read a zero-height pad pixel.
    pad = np.zeros((h + 1, w + 1), dsm.dtype)
    pad[:h, :w] = dsm
    src_r = np.rint(ctr[0] + ii[:, None] * np.float32(across[0]) + jj[None, :] * np.float32(along[0])).astype(np.int32)
    src_c = np.rint(ctr[1] + ii[:, None] * np.float32(across[1]) + jj[None, :] * np.float32(along[1])).astype(np.int32)
    out = (src_r < 0) | (src_r >= h) | (src_c < 0) | (src_c >= w)
    src_r[out] = h
    src_c[out] = w
    rot = pad[src_r, src_c]
    del src_r, src_c, out
    k = np.float32(gsd_m * np.tan(np.radians(elevation_deg)))
    g = rot + jj[None, :] * k
    horizon = np.maximum.accumulate(g, axis=1)
    shade_rot = np.zeros(g.shape, bool)
    shade_rot[:, 1:] = horizon[:, :-1] > g[:, 1:] + 0.05
    del g, horizon, rot
    r = np.arange(h, dtype=np.float32)[:, None] - np.float32(ctr[0])
    c = np.arange(w, dtype=np.float32)[None, :] - np.float32(ctr[1])
    j_of = np.rint(r * np.float32(along[0]) + c * np.float32(along[1]) - np.float32(j_lo)).astype(np.int32)
    i_of = np.rint(r * np.float32(across[0]) + c * np.float32(across[1]) - np.float32(i_lo)).astype(np.int32)
    np.clip(j_of, 0, shade_rot.shape[1] - 1, out=j_of)
    np.clip(i_of, 0, shade_rot.shape[0] - 1, out=i_of)
    return shade_rot[i_of, j_of]

def shading(dsm: np.ndarray, gsd_m: float, sun: np.ndarray) -> np.ndarray:
    """Lambertian factor of roof/canopy slopes relative to flat ground (flat = 1), (H, W).
    Steps steeper than 1.2 m per metre are walls (not seen from above) and count as flat."""
    gy, gx = np.gradient(dsm, gsd_m)
    wall = (np.abs(gx) > 1.2) | (np.abs(gy) > 1.2)
    gx[wall] = 0.0
    gy[wall] = 0.0
    de, dn = gx, -gy  # d height / d east, d height / d north
    cos_i = (-de * sun[0] - dn * sun[1] + sun[2]) / np.sqrt(1.0 + de * de + dn * dn)
    return np.clip(cos_i / sun[2], 0.0, 3.0).astype(np.float32)


def albedo(scene: Scene, season: str, rng: np.random.Generator) -> np.ndarray:
    """Linear RGB reflectance (H, W, 3) float32 with per-object variation and texture."""
    h, w = scene.shape
    gsd = scene.gsd_m
    s = _SEASON[season]
    mat = scene.material
    base = _BASE.copy()
    base[GRASS] = _GRASS[s]
    rgb = base[mat]
    par = scene.parcels
    pid = scene.parcel_id
    tone = par["tone"][pid]

    # Crops: colour per crop type and season, tone per parcel, rows along the parcel's angle.
    m = mat == CROP
    if m.any():
        crop = par["crop"][pid[m]]
        rr, cc = np.nonzero(m)
        ang = par["row_angle"][pid[m]]
        per = par["row_period_m"][pid[m]]
        phase = (cc * np.cos(ang) + rr * np.sin(ang)) * gsd / per
        rows = 1.0 + 0.12 * np.sin(2 * np.pi * phase)
        rgb[m] = _CROP[s][crop] * ((1.0 + 0.10 * par["tone"][pid[m]]) * rows)[:, None]
    # Per-parcel tone on ground materials (moisture, wear, mowing).
    for mm, amp in ((GRASS, 0.12), (SOIL, 0.15), (CONCRETE, 0.10), (ASPHALT, 0.12), (GRAVEL, 0.08), (CONSTRUCTION, 0.10)):
        sel = mat == mm
        rgb[sel] *= (1.0 + amp * tone[sel])[:, None]

    # Roofs and vehicles: colour per object.
    m = mat == ROOF
    rgb[m] = scene.buildings["colour"][scene.building_id[m]]
    m = mat == VEHICLE
    rgb[m] = scene.vehicles["colour"][scene.vehicle_id[m]]

    # Trees: per-tree colour (season, evergreen, autumn hue); forest canopy textured by noise.
    m = mat == TREE
    if m.any():
        tid = scene.tree_id[m]
        ever = scene.trees["evergreen"][tid]
        if season == "autumn":
            col = _AUTUMN[scene.trees["hue"][tid]]
        else:
            col = np.broadcast_to(_TREE[s], (tid.size, 3)).copy()
        forest = tid == 0
        n_patch = smooth_noise(rng, (h, w), 12.0 / gsd)[m]
        if season == "autumn":
            col[forest] = _AUTUMN[np.digitize(n_patch[forest], [-0.4, 0.5])]
        ever = np.where(forest, n_patch > 0.9, ever)
        col[ever] = _EVERGREEN
        rgb[m] = col * scene.trees["colour"][tid]

    m = mat == WATER
    if m.any():
        rgb[m] *= (1.0 + 0.25 * smooth_noise(rng, (h, w), 60.0 / gsd)[m])[:, None]

    grain = smooth_noise(rng, (h, w), 0.7 / gsd if gsd < 1.4 else 0.5)
    medium = smooth_noise(rng, (h, w), 7.0 / gsd)
    rgb *= ((1.0 + _GRAIN[mat] * grain) * (1.0 + 0.05 * medium))[..., None]
    return np.clip(rgb, 0.0, 1.0)


def render_optical(
    scene: Scene,
    rng: np.random.Generator,
    season: str = "summer",
    sun_azimuth_deg: float = 150.0,
    sun_elevation_deg: float = 45.0,
    haze: float = 0.05,
    clouds: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the optical image: returns (RGB uint8 (H, W, 3), sun-shadow mask (H, W))."""
    h, w = scene.shape
    gsd = scene.gsd_m
    rho = albedo(scene, season, rng)
    sun = sun_vector(sun_azimuth_deg, sun_elevation_deg)
    shadow = cast_shadow(scene.dsm, gsd, sun_azimuth_deg, sun_elevation_deg)
    direct = shading(scene.dsm, gsd, sun) * ~shadow
    ambient = 0.22
    illum = ambient * _SKY[None, None, :] + (1.0 - ambient) * direct[..., None]
    rad = rho * illum

    if clouds > 0:
        field = fractal_noise(rng, (h, w), (300.0 / gsd, 90.0 / gsd, 25.0 / gsd), (1.0, 0.5, 0.25))
        thr = np.quantile(field, 1.0 - clouds)
        alpha = np.clip((field - thr) / 0.35 + 0.5, 0.0, 1.0).astype(np.float32) * (field > thr - 0.175)
        # Cloud shadows: the cloud layer (~600 m up) projected away from the sun.
        off = 600.0 / np.tan(np.radians(sun_elevation_deg)) / gsd
        dr = int(round(off * np.cos(np.radians(sun_azimuth_deg))))
        dc = int(round(-off * np.sin(np.radians(sun_azimuth_deg))))
        cshadow = np.zeros_like(alpha)
        r0, r1 = max(0, dr), min(h, h + dr)
        c0, c1 = max(0, dc), min(w, w + dc)
        if r1 > r0 and c1 > c0:
            cshadow[r0:r1, c0:c1] = alpha[r0 - dr : r1 - dr, c0 - dc : c1 - dc]
        rad *= (1.0 - 0.55 * cshadow)[..., None]
    hz = np.clip(haze * (1.0 + 0.3 * smooth_noise(rng, (h, w), 400.0 / gsd)), 0.0, 1.0)[..., None]
    rad = rad * (1.0 - hz) + hz * _HAZE
    if clouds > 0:
        rad = rad * (1.0 - alpha[..., None]) + alpha[..., None] * np.array([0.92, 0.93, 0.95], np.float32)
    # Display encoding: exposure and a 1/2.2 gamma, as a delivered 8-bit product.
    out = np.clip(rad * 1.25, 0.0, 1.0) ** (1.0 / 2.2)
    return np.round(out * 255.0).astype(np.uint8), shadow
