"""When is a scene placement "found"? The decision of ``cmpc georef``, calibrated on scenes
cut from a training area (``cmpc train scene``), never on the test area.

A verified placement comes with four numbers of evidence: how many of the scene's tiles
agree on it (``inliers`` of ``tiles``), the dense alignment's whole-scene correlation
peak (``fine_peak``, a mean cosine; NaN when no fine alignment ran) and how far the whole-map
dense search's best placement stands above the best one elsewhere (``peak_margin``, a
difference of mean cosines, the ratio test of image matching; NaN without the search). Two
deciders map them to found / not found:

- :func:`choose_rule`: three thresholds (inlier tiles, inlier fraction, peak), all must hold;
  picked by grid search.
- :class:`ConfidenceModel`: a logistic model of P(centre within ``good_m``) on
  ``log(1 + inliers)``, the inlier fraction, ``log(tiles)`` and the peak (and, as a
  second candidate, whether headings were searched), fit on the same scenes; "found" when
  the probability reaches a threshold; a third and fourth candidate add the
  peak margin (they may claim a placement that few tiles agree on: a small scene found by
  the dense search alone). Its probability is the answer's ``confidence``. Many agreeing tiles can make up for a weak peak (rotated scenes
  correlate less after resampling) and a strong peak for few tiles, which one set of
  thresholds cannot express.

Both are chosen for the most scenes within ``good_m`` while false claims (found, centre
error over ``bad_m``) stay at most ``max_false`` of the scenes; :func:`choose_decider`
compares them by k-fold cross-validation on the calibration scenes and keeps the better
one (ties: the thresholds). The logistic fit is 4 weights by L-BFGS in torch: a
dependency such as scikit-learn is not worth its size for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: features of the confidence model, in order (see :func:`evidence_features`); ``rotated``:
#: 1 when headings were searched (rotated scenes correlate less after resampling)
FEATURES_FINE = ("log1p_inliers", "inlier_frac", "log_tiles", "fine_peak")
FEATURES_COARSE = ("log1p_inliers", "inlier_frac", "log_tiles")
FEATURES_MARGIN = FEATURES_FINE + ("peak_margin",)
FEATURE_SETS = (FEATURES_FINE, FEATURES_COARSE, FEATURES_FINE + ("rotated",), FEATURES_COARSE + ("rotated",), FEATURES_MARGIN, FEATURES_MARGIN + ("rotated",))


def evidence_features(inliers: np.ndarray, tiles: np.ndarray, peak: np.ndarray | None, rotated: np.ndarray | None = None,
                      margin: np.ndarray | None = None) -> np.ndarray:
    """(n, k) feature matrix (see :data:`FEATURE_SETS`); ``peak`` / ``rotated`` / ``margin``
    None: no such column. A NaN margin (fewer than two distinct dense placements) counts as 0."""
    inl = np.asarray(inliers, dtype=np.float64)
    n = np.maximum(np.asarray(tiles, dtype=np.float64), 1.0)
    cols = [np.log1p(inl), inl / n, np.log(n)]
    if peak is not None:
        cols.append(np.asarray(peak, dtype=np.float64))
    if margin is not None:
        m = np.broadcast_to(np.asarray(margin, dtype=np.float64), inl.shape)
        cols.append(np.where(np.isfinite(m), m, 0.0))
    if rotated is not None:
        cols.append(np.broadcast_to(np.asarray(rotated, dtype=np.float64), inl.shape))
    return np.stack(cols, axis=1)


@dataclass(frozen=True)
class ConfidenceModel:
    """Logistic P(centre within ``good_m``) from the evidence (module doc). ``mean`` /
    ``scale`` standardise the features; ``threshold``: the probability from which a
    placement is claimed."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    threshold: float
    good_m: float = 25.0
    #: fewest agreeing tiles of a claimed placement (0 for the margin models: the dense search
    #: can find a small scene that no tile's candidates agree on)
    min_inliers: int = 2

    @property
    def needs_peak(self) -> bool:
        return "fine_peak" in self.features

    @property
    def uses_margin(self) -> bool:
        return "peak_margin" in self.features

    @property
    def uses_rotation(self) -> bool:
        return "rotated" in self.features

    def probability(self, inliers: Any, tiles: Any, peak: Any = None, rotated: Any = 0.0, margin: Any = float("nan")) -> np.ndarray:
        """P(within ``good_m``) per row (arrays or scalars); ``rotated``: 1 where headings were
        searched; ``margin``: the dense search's peak margin (NaN: none)."""
        x = evidence_features(np.atleast_1d(inliers), np.atleast_1d(tiles), np.atleast_1d(peak) if self.needs_peak else None,
                              np.atleast_1d(rotated) if self.uses_rotation else None,
                              np.atleast_1d(np.asarray(margin, dtype=np.float64)) if self.uses_margin else None)
        z = ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "logistic", "features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept, "threshold": self.threshold, "good_m": self.good_m,
                "min_inliers": self.min_inliers}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ConfidenceModel":
        feats = tuple(str(f) for f in d["features"])
        if feats not in FEATURE_SETS:
            raise ValueError(f"unknown confidence features {feats}")
        k = len(feats)
        vals = [tuple(float(v) for v in d[key]) for key in ("mean", "scale", "coef")]
        if any(len(v) != k for v in vals) or any(s <= 0 for s in vals[1]):
            raise ValueError("confidence model: mean / scale / coef do not match its features")
        out = cls(feats, vals[0], vals[1], vals[2], float(d["intercept"]), float(d["threshold"]), float(d.get("good_m", 25.0)),
                  int(d.get("min_inliers", 2)))
        if not all(math.isfinite(v) for v in (*out.mean, *out.coef, out.intercept, out.threshold)):
            raise ValueError("confidence model holds non-finite numbers")
        return out


@dataclass
class Evidence:
    """The calibration scenes' evidence and errors, as arrays (rule off)."""

    inliers: np.ndarray
    tiles: np.ndarray
    peak: np.ndarray  # NaN where no fine alignment ran
    err: np.ndarray  # centre error, metres (1e9 when no placement)
    rotated: np.ndarray | None = None  # 1 where headings were searched (None: all north-up)
    margin: np.ndarray | None = None  # the dense search's peak margin (NaN where none; None: not recorded)

    def has_margin(self) -> bool:
        return self.margin is not None and bool(np.isfinite(self.margin).any())

    def rot(self) -> np.ndarray:
        return self.rotated if self.rotated is not None else np.zeros(len(self.err))

    @classmethod
    def of_rows(cls, rows: Sequence[dict[str, Any]]) -> "Evidence":
        def arr(key: str, default: float) -> np.ndarray:
            return np.array([default if r.get(key) in (None, "") else float(r[key]) for r in rows], dtype=np.float64)

        err = arr("centre_m", np.nan)
        rot = (arr("heading_range_deg", 0.0) > 0).astype(np.float64)
        return cls(arr("inliers", 0.0), arr("tiles", 0.0), arr("fine_peak", np.nan), np.where(np.isfinite(err), err, 1e9), rot,
                   arr("peak_margin", np.nan))

    def subset(self, idx: np.ndarray) -> "Evidence":
        return Evidence(self.inliers[idx], self.tiles[idx], self.peak[idx], self.err[idx], None if self.rotated is None else self.rotated[idx],
                        None if self.margin is None else self.margin[idx])

    def __len__(self) -> int:
        return len(self.err)


def _best_claim(claims: np.ndarray, err: np.ndarray, good_m: float, bad_m: float, max_false: float) -> tuple[int, tuple[int, int] | None]:
    """Index of the best claim vector (each row of ``claims`` is one candidate decider,
    ordered so that a later row is the stricter one): most good, fewest false, then the
    later; and its (good, false). (-1, None) when none keeps false claims low."""
    n = claims.shape[1]
    good = (claims & (err <= good_m)[None]).sum(1)
    false = (claims & (err > bad_m)[None]).sum(1)
    ok = false <= max_false * n + 1e-9
    if not ok.any():
        return -1, None
    key = np.where(ok, good * (n + 1) * 2 + (n - false), -1)
    i = int(len(key) - 1 - np.argmax(key[::-1]))  # ties: the later (stricter) one
    return i, (int(good[i]), int(false[i]))


_M = np.arange(2, 11)
_F = np.round(np.arange(0.0, 0.85, 0.05), 2)
_P = np.round(np.arange(0.0, 0.61, 0.025), 3)


def choose_rule(ev: Evidence, good_m: float = 25.0, bad_m: float = 100.0, max_false: float = 0.02) -> dict[str, Any]:
    """The thresholds (min_inliers, min_inlier_frac, min_fine_peak) finding the most scenes
    within ``good_m`` with false claims at most ``max_false``; ties: the stricter rule
    (higher peak, then inliers, then fraction). No fine peak: the peak does not decide."""
    frac = ev.inliers / np.maximum(ev.tiles, 1.0)
    peak = np.where(np.isfinite(ev.peak), ev.peak, np.inf)
    grid = np.array([(m, f, p) for m in _M for f in _F for p in _P])
    order = np.lexsort((grid[:, 1], grid[:, 0], grid[:, 2]))  # strictness: peak, then inliers, then fraction
    grid = grid[order]
    claims = (ev.inliers[None] >= grid[:, :1]) & (frac[None] >= grid[:, 1:2]) & (peak[None] >= grid[:, 2:3])
    i, gf = _best_claim(claims, ev.err, good_m, bad_m, max_false)
    if gf is None:  # nothing keeps false claims low: the strictest rule
        i, gf = len(grid) - 1, (0, 0)
    m, f, p = grid[i]
    return {"min_inliers": int(m), "min_inlier_frac": float(f), "min_fine_peak": float(p), "found_good": gf[0], "false_claims": gf[1], "n_scenes": len(ev)}


def rule_claims(rule: dict[str, Any], ev: Evidence) -> np.ndarray:
    frac = ev.inliers / np.maximum(ev.tiles, 1.0)
    peak = np.where(np.isfinite(ev.peak), ev.peak, np.inf)
    return (ev.inliers >= rule["min_inliers"]) & (frac >= rule["min_inlier_frac"]) & (peak >= rule["min_fine_peak"])


def fit_confidence(ev: Evidence, good_m: float = 25.0, bad_m: float = 100.0, max_false: float = 0.02, l2: float = 1e-2,
                   min_inliers: int | None = None, rotation: bool = False, margin: bool = False) -> ConfidenceModel | None:
    """Fit the logistic model (module doc) and its claim threshold; None when the scenes
    hold only one class (nothing to learn from), or when ``rotation`` is asked but the
    scenes are all north-up or all rotated. Rows without a peak are dropped when
    others have one (the model then needs fine alignment); a placement with fewer than
    ``min_inliers`` agreeing tiles is never claimed (default 2, 0 with ``margin``).
    ``rotation``: one more feature, whether headings were searched; ``margin``: one more,
    the dense search's peak margin (None when the scenes record none)."""
    import torch

    if margin and not ev.has_margin():
        return None
    if min_inliers is None:
        min_inliers = 0 if margin else 2
    has_peak = np.isfinite(ev.peak)
    use_peak = bool(has_peak.any())
    keep = has_peak if use_peak else np.ones(len(ev), dtype=bool)
    e = ev.subset(np.flatnonzero(keep))
    y = (e.err <= good_m).astype(np.float64)
    if len(e) < 4 or y.min() == y.max():
        return None
    if rotation and len(np.unique(e.rot())) < 2:
        return None
    mg = e.margin if margin else None
    x = evidence_features(e.inliers, e.tiles, e.peak if use_peak else None, e.rot() if rotation else None, mg)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    xt = torch.tensor((x - mean) / scale, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    if margin and not use_peak:
        return None
    feats = (FEATURES_MARGIN if margin else FEATURES_FINE if use_peak else FEATURES_COARSE) + (("rotated",) if rotation else ())
    model = ConfidenceModel(feats, tuple(mean.tolist()), tuple(scale.tolist()),
                            tuple(w.detach().numpy().tolist()), float(b.detach()), 1.0, good_m, int(min_inliers))
    p = model.probability(e.inliers, e.tiles, e.peak, e.rot(), mg if mg is not None else np.nan)
    never = 1.0 + 1e-6  # a threshold no probability reaches (p can round to exactly 1.0)
    cands = np.unique(np.concatenate([p, [never]]))  # ascending: loosest first, the last claims nothing
    claims = (p[None] >= cands[:, None]) & (e.inliers[None] >= min_inliers)
    i, _ = _best_claim(claims, e.err, good_m, bad_m, max_false)
    thr = float(cands[i]) if i >= 0 else never
    return ConfidenceModel(model.features, model.mean, model.scale, model.coef, model.intercept, thr, good_m, int(min_inliers))


def confidence_claims(model: ConfidenceModel, ev: Evidence) -> np.ndarray:
    margin = ev.margin if ev.margin is not None else np.full(len(ev), np.nan)
    p = model.probability(ev.inliers, ev.tiles, ev.peak, ev.rot(), margin)
    ok = (p >= model.threshold) & (ev.inliers >= model.min_inliers)
    if model.needs_peak:
        ok &= np.isfinite(ev.peak)
    return ok


#: the logistic candidates of :func:`choose_decider`: name -> (rotation feature, margin feature)
_MODELS = {"confidence": (False, False), "confidence+rotation": (True, False), "confidence+margin": (False, True),
           "confidence+margin+rotation": (True, True)}


def choose_decider(ev: Evidence, good_m: float = 25.0, bad_m: float = 100.0, max_false: float = 0.02, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Thresholds and the confidence models (plain, with the ``rotated`` feature, with the
    peak margin, with both; the margin ones only when the scenes record margins), each fit
    on all scenes, compared by ``folds``-fold cross-validation (each fit on the other folds,
    counted on its own): the decider with the most held-out scenes found within ``good_m``
    among those whose held-out false claims stay at most ``max_false`` wins (ties: the
    simpler, in that order). Returns ``{"rule", "confidence" (the chosen model, or the plain
    one, or None), "decider": "rule" | "confidence", "chosen", "cv": {...}}``."""
    rule = choose_rule(ev, good_m, bad_m, max_false)
    models = {name: fit_confidence(ev, good_m, bad_m, max_false, rotation=rot, margin=mg) for name, (rot, mg) in _MODELS.items()}
    n = len(ev)
    perm = np.random.default_rng(seed).permutation(n)
    names = ("rule", *_MODELS)
    cv: dict[str, Any] = {k: {"good": 0, "false": 0} for k in names}
    for k in range(folds):
        test = perm[k::folds]
        train = np.setdiff1d(perm, test)
        tr, te = ev.subset(train), ev.subset(test)
        claims = {"rule": rule_claims(choose_rule(tr, good_m, bad_m, max_false), te)}
        for name, (rot, mg) in _MODELS.items():
            m = fit_confidence(tr, good_m, bad_m, max_false, rotation=rot, margin=mg) if models[name] is not None else None
            claims[name] = confidence_claims(m, te) if m is not None else np.zeros(len(te), dtype=bool)
        for name, c in claims.items():
            cv[name]["good"] += int((c & (te.err <= good_m)).sum())
            cv[name]["false"] += int((c & (te.err > bad_m)).sum())
    for name in names:
        cv[name]["n_scenes"] = n
        if name != "rule" and models[name] is None:
            cv[name]["unavailable"] = True
    ok = [k for k in names if (k == "rule" or models[k] is not None) and cv[k]["false"] <= max_false * n + 1e-9]
    best = max(ok, key=lambda k: (cv[k]["good"], -names.index(k))) if ok else "rule"
    model = models[best] if best != "rule" else (models["confidence"] or models["confidence+rotation"])
    return {"rule": rule, "confidence": model, "decider": "rule" if best == "rule" else "confidence", "chosen": best,
            "cv": {**cv, "folds": folds, "criterion": f"held-out scenes within {good_m:g} m with held-out false claims (> {bad_m:g} m) at most {max_false:.0%}"}}
