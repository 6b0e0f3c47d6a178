"""N-way SAR -> optical retrieval on a set of co-located patch pairs (``cmpc eval pairs``).

Each SAR patch is a query; the N optical patches are the gallery; the correct one is its own
pair. Reported: recall@k (share of queries whose pair ranks within the top k), mAP (one
correct item per query: mean of 1/rank), the median rank, and the chance levels of a random
ranking (recall@k = k/N, mAP = H_N/N with H_N the N-th harmonic number).

Unlike ``test.py`` this needs no map and no positions: it checks whether an embedder trained
elsewhere tells real SAR/optical pairs apart (the BigEarthNet 60-way check, docs/RESULTS.md).
Inputs are standardised per patch and channel exactly as in training
(:func:`cmpc.data.patches.to_model_input`).
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmpc.data.patches import standardize, to_model_input
from cmpc.errors import ConfigError, DataError
from cmpc.evaluate.metrics import mean_average_precision, recall_at_k
from cmpc.models.embedder import Embedder

#: Known pair sets (``--pairs``) and their default folder, relative to the working directory.
PAIR_SETS = {"bigearthnet": "../shared/data/real/bigearthnet-s1s2"}
#: How a 120 px patch becomes a model input: resize to img_size, centre crop of img_size px at
#: the native 10 m, or the whole patch at its native size (the trunk is convolutional).
FITS = ("resize", "crop", "native")
#: SAR value scales: dB as stored, linear amplitude 10^(dB/20), linear intensity 10^(dB/10).
SAR_SCALES = ("db", "amplitude", "intensity")


def pair_ranks(sar_emb: np.ndarray, opt_emb: np.ndarray) -> np.ndarray:
    """(N,) 1-based rank of optical patch i for SAR query i among all N optical patches.

    ``sar_emb``, ``opt_emb``: (N, D) L2-normalised embeddings (cosine = dot product). Ties
    count against the query (rank = 1 + number of *other* optical patches scoring at least as
    high), so a collapsed embedder that maps everything to one vector ranks last, not first.
    """
    s = np.asarray(sar_emb, dtype=np.float64)
    o = np.asarray(opt_emb, dtype=np.float64)
    if s.ndim != 2 or s.shape != o.shape:
        raise ValueError(f"expected two (N, D) arrays of the same shape, got {s.shape} and {o.shape}")
    scores = s @ o.T  # (N, N)
    correct = np.diag(scores)[:, None]
    at_least = scores >= correct
    np.fill_diagonal(at_least, False)
    return 1.0 + at_least.sum(axis=1).astype(np.float64)


def chance_levels(n: int, ks: Sequence[int]) -> dict[str, Any]:
    """Recall@k and mAP of a uniformly random ranking of ``n`` items (one correct)."""
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1))) if n else 0.0
    return {"recall": {str(int(k)): min(1.0, k / n) if n else None for k in ks}, "mAP": harmonic / n if n else None}


def pair_retrieval_metrics(sar_emb: np.ndarray, opt_emb: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """``{"n", "recall": {k: share}, "mAP", "median_rank", "ranks", "chance": {...}}`` of SAR -> optical."""
    ranks = pair_ranks(sar_emb, opt_emb)
    n = int(len(ranks))
    return {
        "n": n,
        "recall": recall_at_k(ranks, ks),
        "mAP": mean_average_precision(ranks),
        "median_rank": float(np.median(ranks)) if n else None,
        "ranks": [int(r) for r in ranks],
        "chance": chance_levels(n, ks),
    }


def sar_values(sar_db: np.ndarray, scale: str) -> np.ndarray:
    """Convert SAR backscatter in dB to ``scale`` (see :data:`SAR_SCALES`); float32."""
    if scale == "db":
        return sar_db.astype(np.float32)
    if scale == "amplitude":
        return np.power(10.0, sar_db / 20.0).astype(np.float32)
    if scale == "intensity":
        return np.power(10.0, sar_db / 10.0).astype(np.float32)
    raise ConfigError(f"SAR scale {scale!r} is not one of {list(SAR_SCALES)}")


def model_inputs(arrays: np.ndarray, img_size: int, fit: str) -> torch.Tensor:
    """(N, C, H, W) patches -> standardised float32 model inputs (N, C, s, s).

    ``fit``: ``resize`` (to ``img_size`` px; the ground resolution changes by H/img_size),
    ``crop`` (centre ``img_size`` px at the native resolution), ``native`` (the whole patch).
    """
    if fit not in FITS:
        raise ConfigError(f"fit {fit!r} is not one of {list(FITS)}")
    a = np.asarray(arrays, dtype=np.float32)
    h, w = a.shape[-2:]
    if fit == "crop":
        if img_size > min(h, w):
            raise ConfigError(f"cannot crop {img_size} px out of {h}x{w} px patches; use --fit resize")
        y0, x0 = (h - img_size) // 2, (w - img_size) // 2
        a = a[..., y0 : y0 + img_size, x0 : x0 + img_size]
    if fit == "resize":
        return torch.stack([to_model_input(x, img_size) for x in a])
    return standardize(torch.from_numpy(np.ascontiguousarray(a)))


@torch.no_grad()
def embed_arrays(model: Embedder, inputs: torch.Tensor, modality: str, batch_size: int = 64) -> np.ndarray:
    """(N, D) float32 embeddings of model inputs (N, C, s, s) for ``modality`` ("sar" | "opt")."""
    model.eval()
    out = [model(inputs[i : i + batch_size], modality).float().cpu().numpy() for i in range(0, len(inputs), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), dtype=np.float32)


def _select_sar(sar: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    from cmpc.data.bigearthnet import SAR_BANDS

    bad = [b for b in bands if b not in SAR_BANDS]
    if bad:
        raise ConfigError(f"SAR band {bad[0]!r} is not one of {list(SAR_BANDS)}")
    return sar[:, [SAR_BANDS.index(b) for b in bands]]


def evaluate_bigearthnet(
    model: Embedder,
    img_size: int,
    root: str | os.PathLike[str] = PAIR_SETS["bigearthnet"],
    fit: str = "resize",
    sar_scale: str = "db",
    sar_bands: Sequence[str] = ("VV", "VH"),
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """60-way SAR -> optical retrieval on the BigEarthNet pairs with an embedder.

    The optical input is (B04, B03, B02) for a 3-band embedder, plus B08 for a 4-band one;
    the SAR input is ``sar_bands`` (default VV, VH) converted to ``sar_scale``. Returns
    :func:`pair_retrieval_metrics` plus the settings and pair names.
    """
    from cmpc.data.bigearthnet import RGB_BANDS, NIR_BAND, load_bigearthnet_pairs

    opt_ch, sar_ch = int(model.optical_channels), int(model.sar_channels)
    if opt_ch not in (3, 4):
        raise DataError(f"the embedder takes {opt_ch} optical band(s); BigEarthNet gives 3 (B04, B03, B02) or 4 (+ B08)")
    if len(sar_bands) != sar_ch:
        raise DataError(f"the embedder takes {sar_ch} SAR band(s) but {len(sar_bands)} were chosen ({' '.join(sar_bands)}); pass --sar-bands with {sar_ch} of VV, VH")
    pairs = load_bigearthnet_pairs(root, nir=opt_ch == 4)
    sar = _select_sar(np.stack([p.sar for p in pairs]), sar_bands)
    opt = np.stack([p.optical for p in pairs])
    s_emb = embed_arrays(model, model_inputs(sar_values(sar, sar_scale), img_size, fit), "sar")
    o_emb = embed_arrays(model, model_inputs(opt, img_size, fit), "opt")
    res = pair_retrieval_metrics(s_emb, o_emb, ks)
    res["settings"] = {
        "root": str(root),
        "fit": fit,
        "img_size": int(img_size),
        "sar_scale": sar_scale,
        "sar_bands": list(sar_bands),
        "optical_bands": list(RGB_BANDS) + ([NIR_BAND] if opt_ch == 4 else []),
    }
    res["pairs"] = [p.name for p in pairs]
    return res


def run_pairs_eval(
    checkpoint: str | os.PathLike[str],
    report_dir: str | os.PathLike[str],
    pairs: str = "bigearthnet",
    root: str | os.PathLike[str] | None = None,
    fit: str = "resize",
    sar_scale: str = "db",
    sar_bands: Sequence[str] = ("VV", "VH"),
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """Load the embedder, evaluate it on a pair set, write ``REPORT_DIR/pairs_<set>_<fit>_<scale>.json``."""
    from cmpc.models.checkpoint import load_embedder
    from cmpc.utils.io import atomic_write_json

    if pairs not in PAIR_SETS:
        raise ConfigError(f"unknown pair set {pairs!r}; known: {sorted(PAIR_SETS)}")
    model, meta = load_embedder(checkpoint)
    img_size = int(meta.get("img_size") or 0)
    if img_size <= 0:
        raise DataError(f"{checkpoint} does not record its input size (img_size)")
    res = evaluate_bigearthnet(model, img_size, root or PAIR_SETS[pairs], fit, sar_scale, sar_bands, ks)
    res["meta"] = {
        "pairs": pairs,
        "checkpoint": str(checkpoint),
        "checkpoint_hash": meta["hash"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(report_dir) / f"pairs_{pairs}_{fit}_{sar_scale}_{''.join(sar_bands).lower()}.json"
    atomic_write_json(out, res)
    print(f"wrote {out}", file=sys.stderr)
    return res
