"""Evaluation plots (matplotlib figures saved as PNG; no pyplot, so no backend is chosen for the
process), drawn from the numbers in metrics.json.

- :func:`plot_cmc`: recall@k against k, coarse vs refined, per query set.
- :func:`plot_error_cdf`: share of queries within an error (log-x metres), coarse vs refined.
- :func:`plot_retrieval_grid`: query patches and their top candidates; the correct reference
  framed green, wrong ones red, with cosine scores.
- :func:`plot_error_map`: reference footprints with an arrow per query from its true to its
  predicted position, coloured by error (metres).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import matplotlib.cm
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from cmpc.evaluate.metrics import CDF_GRID_M
from cmpc.utils.io import atomic_path

_STYLE = {"coarse": "--", "refined": "-"}


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # constrained layout: no second "tight" render
    return path


def plot_cmc(curves: dict[str, dict[str, Sequence[float | None]]], path: str | os.PathLike[str]) -> Path:
    """``curves[set][stage]`` = recall@1..K (stage ``coarse``/``refined``) -> CMC plot PNG."""
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (qset, stages) in enumerate(curves.items()):
        for stage, ys in stages.items():
            y = np.array([np.nan if v is None else v for v in ys], dtype=float)
            if not np.isfinite(y).any():
                continue
            ax.plot(np.arange(1, len(y) + 1), y, _STYLE.get(stage, "-"), color=colors[i % len(colors)], label=f"{qset} {stage}", marker="." if len(y) <= 30 else None)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("k (candidates)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.set_title("CMC: share of queries with the correct reference in the top k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_error_cdf(curves: dict[str, dict[str, Sequence[float | None]]], path: str | os.PathLike[str], grid_m: np.ndarray = CDF_GRID_M) -> Path:
    """``curves[set][stage]`` = share within each ``grid_m`` metres -> error CDF PNG (log x)."""
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (qset, stages) in enumerate(curves.items()):
        for stage, ys in stages.items():
            y = np.array([np.nan if v is None else v for v in ys], dtype=float)
            if not np.isfinite(y).any():
                continue
            ax.step(grid_m, y, _STYLE.get(stage, "-"), where="post", color=colors[i % len(colors)], label=f"{qset} {stage}")
    ax.set_xscale("log")
    ax.set_xlabel("localization error (m)")
    ax.set_ylabel("share of queries within")
    ax.set_ylim(0, 1.02)
    ax.set_title("Localization error CDF")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def display_image(arr: np.ndarray) -> np.ndarray:
    """(C, H, W) any range -> (H, W, 3) or (H, W) in [0, 1] by 2-98 % percentile stretch."""
    a = np.asarray(arr, dtype=np.float32)
    a = a[:3] if a.shape[0] >= 3 else a[:1]
    lo, hi = np.nanpercentile(a, 2), np.nanpercentile(a, 98)
    a = np.clip((a - lo) / (hi - lo + 1e-6), 0, 1)
    return np.moveaxis(a, 0, -1) if a.shape[0] == 3 else a[0]


def plot_retrieval_grid(
    samples: Sequence,
    load_reference: Callable[[int], np.ndarray | None],
    path: str | os.PathLike[str],
) -> Path:
    """A row per query: the SAR query, then its top candidates (optical), best first.

    ``samples``: objects with ``name``, ``image`` (C, S, S), ``true_id``, ``rows``, ``ids``,
    ``scores``; ``load_reference(row)`` returns the reference patch (C, H, W) or None.
    """
    n = max(1, len(samples))
    cols = 1 + max([len(s.rows) for s in samples] or [1])
    fig = Figure(figsize=(1.6 * cols, 1.8 * n + 0.4), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if not samples:
        axes[0, 0].set_title("no queries")
    for r, s in enumerate(samples):
        img = display_image(s.image)
        axes[r, 0].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r, 0].set_title(f"query {s.name}\nid {s.true_id}", fontsize=7)
        for c, (row, rid, score) in enumerate(zip(s.rows, s.ids, s.scores), start=1):
            ax = axes[r, c]
            ref = load_reference(int(row))
            if ref is not None:
                im = display_image(ref)
                ax.imshow(im, cmap="gray" if im.ndim == 2 else None)
            else:
                ax.text(0.5, 0.5, "image\nmissing", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            ok = s.true_id >= 0 and int(rid) == s.true_id
            color = "#1a9e3a" if ok else "#d62728"
            for sp in ax.spines.values():
                sp.set_edgecolor(color)
                sp.set_linewidth(3)
            ax.set_title(f"#{c} id {int(rid)}\n{float(score):.3f}", fontsize=7, color=color)
    fig.suptitle("Retrieval: query (SAR) and top candidates (optical); green = correct", fontsize=9)
    return _save(fig, path)


def plot_error_map(
    footprints_gpkg: str | os.PathLike[str] | None,
    true_xy: np.ndarray,
    pred_xy: np.ndarray,
    path: str | os.PathLike[str],
    title: str = "Localization errors",
    max_arrows: int = 3000,
    max_footprints: int = 20_000,
) -> Path:
    """Reference footprints (outlines) and an arrow per query true -> predicted, coloured by
    error in metres (log colour scale). At most ``max_arrows`` queries (evenly subsampled)."""
    import matplotlib.colors as mcolors

    fp = None
    if footprints_gpkg is not None and Path(footprints_gpkg).is_file():
        import geopandas as gpd

        fp = gpd.read_file(footprints_gpkg, engine="pyogrio")
        if len(fp) > max_footprints:
            fp = fp.iloc[np.linspace(0, len(fp) - 1, max_footprints).astype(int)]
    ok = np.isfinite(true_xy).all(axis=1) & np.isfinite(pred_xy).all(axis=1)
    t, p = true_xy[ok], pred_xy[ok]
    # figure shaped like the map (a long strip stays readable), colour bar beside it
    pts = np.concatenate([t, p]) if len(t) else np.zeros((0, 2))
    if fp is not None and len(fp):
        b = fp.total_bounds
        pts = np.concatenate([pts, [[b[0], b[1]], [b[2], b[3]]]])
    span = np.ptp(pts, axis=0) if len(pts) else np.ones(2)
    aspect = float(np.clip(span[0] / max(span[1], 1e-9), 0.25, 4.0))
    h = 6.5 if aspect <= 1 else max(3.5, 8.0 / aspect)
    fig = Figure(figsize=(max(3.5, h * aspect) + 1.6, h), layout="constrained")
    ax = fig.subplots()
    if fp is not None:
        fp.boundary.plot(ax=ax, color="0.75", linewidth=0.4, zorder=1)
    if len(t) > max_arrows:
        pick = np.linspace(0, len(t) - 1, max_arrows).astype(int)
        t, p = t[pick], p[pick]
    if len(t):
        err = np.hypot(*(p - t).T)
        norm = mcolors.LogNorm(vmin=max(0.1, float(err[err > 0].min()) if (err > 0).any() else 0.1), vmax=max(1.0, float(err.max())))
        cmap = matplotlib.colormaps["viridis"]
        d = p - t
        ax.quiver(t[:, 0], t[:, 1], d[:, 0], d[:, 1], np.maximum(err, norm.vmin), cmap=cmap, norm=norm, angles="xy", scale_units="xy", scale=1, width=0.003, zorder=3)
        ax.scatter(t[:, 0], t[:, 1], s=6, c=np.maximum(err, norm.vmin), cmap=cmap, norm=norm, zorder=4)
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="error (m)")
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=7)
    ax.set_title(title + "\ndot = true position, arrow -> predicted", fontsize=9)
    return _save(fig, path)
