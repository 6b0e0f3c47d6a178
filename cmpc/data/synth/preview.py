"""``preview.png``: optical and SAR side by side, and a zoom on the tallest building showing
layover (toward the sensor) and radar shadow (away from it) next to the optical footprint.

Axes are metres from the world's south-west corner (x east, y north).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmpc.config import SynthConfig
from cmpc.data.synth.sar import BANDS

_BOX = {"facecolor": "black", "alpha": 0.6, "lw": 0, "pad": 2}
_DIR = {"east": (1.0, 0.0), "west": (-1.0, 0.0), "north": (0.0, 1.0), "south": (0.0, -1.0)}


def geom_side(look: str) -> str:
    """The side of the scene the sensor sits on, for a look direction."""
    return {"east": "west", "west": "east", "north": "south", "south": "north"}[look]


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Downsample (H, W[, C]) by integer block means (display only)."""
    if k <= 1:
        return a
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    a = a[:h, :w].astype(np.float32)
    return a.reshape(h // k, k, w // k, k, *a.shape[2:]).mean(axis=(1, 3))


def _pick_building(world: dict[str, Any], margin_px: int, tan_t: float) -> tuple[int, float, tuple[float, float]] | None:
    """A tall building of the optical date, present at the SAR date too, away from the border
    and from other tall buildings (so its layover and shadow are not hidden):
    (id, height m, centre (row, col) px)."""
    scene = world["scene_optical"]
    bid = scene.building_id
    h, w = bid.shape
    gsd = scene.gsd_m
    heights = scene.buildings["height"]
    ids = np.unique(bid[margin_px : h - margin_px, margin_px : w - margin_px])
    ids = ids[ids > 0]
    ids = ids[np.isin(ids, np.unique(world["scene_sar"].building_id))]
    if ids.size == 0:
        return None
    ids = ids[np.argsort(-heights[ids])][:40]
    rc = world["buildings"].table["rc"]
    best, best_score = None, -1.0
    for i in ids:
        hb = float(heights[i])
        r, c = rc[i]
        rad = int((hb / tan_t + hb * tan_t) / gsd) + 10
        win = bid[max(0, int(r) - rad) : int(r) + rad, max(0, int(c) - rad) : int(c) + rad]
        others = np.unique(win[(win > 0) & (win != i)])
        clutter = float(heights[others].max()) if others.size else 0.0
        score = hb - 1.5 * clutter
        if score > best_score:
            best, best_score = int(i), score
    assert best is not None
    rr, cc = np.nonzero(bid == best)
    return best, float(heights[best]), (float(rr.mean()), float(cc.mean()))


def make_preview(path: Path, world: dict[str, Any], cfg: SynthConfig, max_px: int = 900, dpi: int = 80) -> None:
    """Write the preview PNG for a world from :func:`~cmpc.data.synth.world.build_world`."""
    from matplotlib.figure import Figure  # not pyplot: no backend is chosen for the process
    from matplotlib.patches import Rectangle

    optical = world["optical"]
    sar = world["sar"][0]
    if not cfg.sar_db:
        sar = 10.0 * np.log10(np.maximum(sar, 1e-6))
    h, w = sar.shape
    gsd = float(cfg.gsd_m)
    size_x, size_y = w * gsd, h * gsd
    lo, hi = np.percentile(sar[:: max(1, h // 512), :: max(1, w // 512)], [1.0, 99.5])
    k = max(1, int(np.ceil(max(h, w) / max_px)))
    band = BANDS[cfg.polarisations][0]
    theta = float(cfg.incidence_deg)
    tan_t = np.tan(np.radians(theta))

    fig = Figure(figsize=(12, 12.6), dpi=dpi)
    axes = fig.subplots(2, 2)
    extent = (0.0, size_x, 0.0, size_y)
    axes[0, 0].imshow(_block_mean(optical, k).astype(np.uint8), extent=extent, interpolation="antialiased")
    axes[0, 0].set_title(f"optical RGB (date 1), sun az {cfg.sun_azimuth_deg:g}\N{DEGREE SIGN} el {cfg.sun_elevation_deg:g}\N{DEGREE SIGN}")
    axes[0, 1].imshow(_block_mean(sar, k), extent=extent, cmap="gray", vmin=lo, vmax=hi, interpolation="antialiased")
    axes[0, 1].set_title(f"SAR {band} dB (date 2), look {cfg.look}, incidence {theta:g}\N{DEGREE SIGN}, L={cfg.looks}")

    pick = _pick_building(world, margin_px=int(60 / gsd), tan_t=tan_t)
    if pick is not None:
        bid, bh, (rc, cc) = pick
        lay_m, shd_m = bh / tan_t, bh * tan_t
        side = float(np.clip(lay_m + shd_m + 120.0, 160.0, 420.0))
        dx, dy = _DIR[cfg.look]
        # Centre between the layover tip (toward the sensor) and the shadow end (away).
        cx = cc * gsd + dx * (shd_m - lay_m) / 2.0
        cy = size_y - rc * gsd + dy * (shd_m - lay_m) / 2.0
        x0, x1 = np.clip([cx - side / 2, cx + side / 2], 0, size_x)
        y0, y1 = np.clip([cy - side / 2, cy + side / 2], 0, size_y)
        c0, c1 = int(x0 / gsd), int(np.ceil(x1 / gsd))
        r0, r1 = int((size_y - y1) / gsd), int(np.ceil((size_y - y0) / gsd))
        z_ext = (c0 * gsd, c1 * gsd, size_y - r1 * gsd, size_y - r0 * gsd)
        axes[1, 0].imshow(optical[r0:r1, c0:c1], extent=z_ext, interpolation="nearest")
        axes[1, 1].imshow(sar[r0:r1, c0:c1], extent=z_ext, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        fp = (world["scene_optical"].building_id[r0:r1, c0:c1] == bid).astype(float)
        xs = (np.arange(c0, c1) + 0.5) * gsd
        ys = size_y - (np.arange(r0, r1) + 0.5) * gsd
        for ax in axes[1]:
            ax.contour(xs, ys, fp, levels=[0.5], colors="cyan", linewidths=1.2)
        # Where the roof appears in the SAR image: the footprint moved toward the sensor.
        axes[1, 1].contour(xs - dx * lay_m, ys - dy * lay_m, fp, levels=[0.5], colors="yellow", linewidths=1.0, linestyles="dashed")
        for ax in axes[0]:
            ax.add_patch(Rectangle((z_ext[0], z_ext[2]), z_ext[1] - z_ext[0], z_ext[3] - z_ext[2], fill=False, ec="yellow", lw=1.5))
        for ax in axes[1]:
            ax.set_xlim(z_ext[0], z_ext[1])
            ax.set_ylim(z_ext[2], z_ext[3])
        bx, by = cc * gsd, size_y - rc * gsd
        ax = axes[1, 1]
        ax.annotate("roof in layover\n(toward sensor)", xy=(bx - dx * lay_m, by - dy * lay_m),
                    xytext=(bx - dx * lay_m - dy * side * 0.3, by - dy * lay_m - dx * side * 0.3),
                    color="yellow", fontsize=10, ha="center", arrowprops={"arrowstyle": "->", "color": "yellow"}, bbox=_BOX)
        ax.annotate("radar shadow", xy=(bx + dx * (shd_m * 0.5 + 8), by + dy * (shd_m * 0.5 + 8)),
                    xytext=(bx + dx * (shd_m * 0.5 + 8) + dy * side * 0.3, by + dy * (shd_m * 0.5 + 8) + dx * side * 0.3),
                    color="orange", fontsize=10, ha="center", arrowprops={"arrowstyle": "->", "color": "orange"}, bbox=_BOX)
        ax.annotate("", xy=(0.5 + 0.18 * dx, 0.06 + 0.04 * dy + 0.02), xytext=(0.5 - 0.18 * dx, 0.06 - 0.04 * dy + 0.02),
                    xycoords="axes fraction", arrowprops={"arrowstyle": "-|>", "color": "white", "lw": 2})
        ax.text(0.03, 0.96, f"radar looks {cfg.look} (arrow); sensor on the {geom_side(cfg.look)} side", transform=ax.transAxes,
                color="white", ha="left", va="top", fontsize=10, bbox=_BOX)
        axes[1, 0].set_title(f"zoom: building {bh:.0f} m tall (cyan: footprint), sun shadow")
        axes[1, 1].set_title(f"zoom: roof laid over {lay_m:.0f} m toward sensor (dashed), shadow {shd_m:.0f} m")
    else:
        for ax in axes[1]:
            ax.set_axis_off()
    for ax in axes.ravel():
        if ax.axison:
            ax.set_xlabel("x (m east of the west edge)")
            ax.set_ylabel("y (m north of the south edge)")
    fig.suptitle(
        f"cmpc synthetic world: seed {cfg.seed}, {size_x:g} m x {size_y:g} m at {gsd:g} m/px, EPSG:{cfg.epsg}", fontsize=13
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, format="png")
    _shrink_png(path)


def _shrink_png(path: Path) -> None:
    """Re-encode as a 256-colour palette PNG (a third of the size, no visible loss here)."""
    from PIL import Image

    with Image.open(path) as im:
        q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    q.save(path, format="PNG", optimize=True)
