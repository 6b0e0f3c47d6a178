"""The scene decision (cmpc.localize.decision): thresholds and the calibrated confidence model,
their choice by cross-validation, the decision file and re-choosing from saved answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmpc.errors import DataError
from cmpc.localize.decision import (
    ConfidenceModel,
    Evidence,
    choose_decider,
    choose_rule,
    confidence_claims,
    fit_confidence,
    rule_claims,
)


def _two_regimes(n: int = 240, seed: int = 0) -> Evidence:
    """Calibration-like evidence where no single set of thresholds separates right from
    wrong: right placements either have many agreeing tiles and a weak peak (rotated
    scenes) or few tiles and a strong peak; wrong ones have few tiles and a weak peak."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, n)  # 0 wrong, 1 right with many tiles, 2 right with a strong peak
    tiles = np.full(n, 64.0)
    inl = np.where(kind == 1, rng.integers(20, 45, n), rng.integers(2, 12, n)).astype(np.float64)
    peak = np.where(kind == 2, rng.uniform(0.45, 0.75, n), rng.uniform(0.05, 0.30, n))
    peak = np.where(kind == 0, rng.uniform(0.05, 0.30, n), peak)
    err = np.where(kind == 0, rng.uniform(500, 6000, n), rng.uniform(0.1, 3.0, n))
    return Evidence(inl, tiles, peak, err)


def test_rule_thresholds_on_a_known_split() -> None:
    # right ones: peak >= 0.3; wrong ones: peak <= 0.2 with as many tiles: the peak decides,
    # and of the tied thresholds the strictest (0.3) is kept
    peak = np.array([0.30, 0.35, 0.5, 0.6, 0.1, 0.15, 0.2, 0.2])
    ev = Evidence(np.full(8, 10.0), np.full(8, 16.0), peak, np.array([1, 2, 1, 3, 900, 800, 700, 2000.0]))
    r = choose_rule(ev, max_false=0.0)
    assert r["min_fine_peak"] == pytest.approx(0.3)
    assert (r["found_good"], r["false_claims"]) == (4, 0)
    assert rule_claims(r, ev).tolist() == [True] * 4 + [False] * 4


def test_confidence_model_beats_thresholds_when_evidence_trades_off() -> None:
    ev = _two_regimes()
    right = ev.err <= 25.0
    d = choose_decider(ev, max_false=0.02)
    assert d["decider"] == "confidence"
    cv = d["cv"]
    # thresholds must give up one regime of right placements; the model keeps both
    assert cv["confidence"]["good"] > cv["rule"]["good"] + 0.15 * right.sum()
    assert cv["confidence"]["false"] <= 0.02 * len(ev)
    m = d["confidence"]
    claims = confidence_claims(m, ev)
    assert (claims & right).sum() >= 0.9 * right.sum()
    assert (claims & ~right).sum() <= 0.02 * len(ev)
    # probabilities order the regimes: many tiles or a strong peak -> high, neither -> low
    p = m.probability([30, 4, 4], [64, 64, 64], [0.15, 0.6, 0.15])
    assert p[0] > m.threshold and p[1] > m.threshold and p[2] < m.threshold


def test_confidence_model_round_trip_and_refusals() -> None:
    m = fit_confidence(_two_regimes())
    assert m is not None and m.needs_peak
    again = ConfidenceModel.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m
    bad = m.to_json() | {"coef": [1.0, 2.0]}
    with pytest.raises(ValueError):
        ConfidenceModel.from_json(bad)
    with pytest.raises(ValueError):
        ConfidenceModel.from_json(m.to_json() | {"features": ["log1p_inliers", "height"]})
    # one class only: nothing to learn
    ev = _two_regimes()
    assert fit_confidence(Evidence(ev.inliers, ev.tiles, ev.peak, np.full(len(ev), 1.0))) is None


def test_no_peak_means_a_coarse_model() -> None:
    ev = _two_regimes()
    m = fit_confidence(Evidence(ev.inliers, ev.tiles, np.full(len(ev), np.nan), ev.err))
    assert m is not None and not m.needs_peak and len(m.coef) == 3


def test_decide_uses_the_model_and_says_why() -> None:
    from cmpc.localize.georef import decide
    from cmpc.localize.scene import SceneSettings

    m = fit_confidence(_two_regimes())
    s = SceneSettings(min_inliers=2, min_inlier_frac=0.3, min_fine_peak=0.4, confidence=m)
    ok, why, conf = decide(s, 30, 64, 0.15)  # the thresholds would refuse this (peak 0.15 < 0.4)
    assert ok and why is None and conf >= m.threshold
    ok, why, conf = decide(s, 4, 64, 0.15)
    assert not ok and "calibrated confidence" in why and conf < m.threshold
    ok, why, _ = decide(s, 1, 64, 0.9)  # one tile cannot agree with anything
    assert not ok and "at least 2" in why
    # no fine alignment ran but the model needs its peak: the thresholds decide
    ok, why, _ = decide(s, 10, 64, None)
    assert not ok and "rule needs" in why
    assert decide(s, 30, 64, None)[0]


def test_decision_file_with_a_confidence_model(tmp_path) -> None:
    from cmpc.localize.georef import DECISION_FILE, load_decision
    from cmpc.localize.scene import SceneSettings

    m = fit_confidence(_two_regimes())
    rec = {"min_inliers": 2, "min_inlier_frac": 0.3, "min_fine_peak": 0.4, "decider": "confidence", "confidence": m.to_json(),
           "methods": {"gnn+verify": {"min_inliers": 3, "min_inlier_frac": 0.2, "min_fine_peak": 0.3, "decider": "rule", "confidence": m.to_json()}}}
    (tmp_path / DECISION_FILE).write_text(json.dumps(rec))
    s, src = load_decision(tmp_path, SceneSettings())
    assert s.confidence == m and src["confidence"]["threshold"] == m.threshold
    g, _ = load_decision(tmp_path, SceneSettings(), method="gnn+verify")
    assert g.confidence is None and g.min_inliers == 3  # its calibration kept the thresholds
    rec["confidence"] = {"features": ["log1p_inliers"], "mean": [0.0]}
    (tmp_path / DECISION_FILE).write_text(json.dumps(rec))
    with pytest.raises(DataError, match="not a scene decision file"):
        load_decision(tmp_path, SceneSettings())


def test_rechoose_from_saved_calibration_answers(tmp_path) -> None:
    from cmpc.localize.georef import DECISION_FILE
    from cmpc.train.scene import CALIBRATION_FILE, rechoose, write_calibration_rows

    ev = _two_regimes()
    rows = []
    for method in ("verify", "gnn+verify"):
        rows += [{"method": method, "tiles_per_side": 8, "heading_range_deg": 15.0, "scene": f"s{i}.tif", "inliers": int(ev.inliers[i]),
                  "tiles": int(ev.tiles[i]), "fine_peak": float(ev.peak[i]), "centre_m": float(ev.err[i])} for i in range(len(ev))]
    write_calibration_rows(tmp_path / CALIBRATION_FILE, rows)
    (tmp_path / DECISION_FILE).write_text(json.dumps({"min_inliers": 9, "min_inlier_frac": 0.8, "min_fine_peak": 0.6, "top_k": 100,
                                                      "default_method": {"method": "verify"}}))
    rec = rechoose(tmp_path)
    saved = json.loads((tmp_path / DECISION_FILE).read_text())
    assert saved == rec
    assert rec["decider"] == "confidence" and rec["methods"]["gnn+verify"]["decider"] == "confidence"
    assert rec["top_k"] == 100 and rec["default_method"] == {"method": "verify"}  # other records kept
    assert rec["chosen_on"]["found_within_25m"] >= 0.9 * int((ev.err <= 25).sum())
    (tmp_path / CALIBRATION_FILE).write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a scene calibration file"):
        rechoose(tmp_path)


def test_rotation_feature_when_rotated_scenes_correlate_less() -> None:
    # right rotated placements have weaker peaks than right north-up ones, and wrong
    # north-up placements reach those peaks: only a model that knows the heading search
    # keeps the rotated right ones without claiming the wrong north-up ones
    rng = np.random.default_rng(3)
    n = 400
    rot = rng.integers(0, 2, n).astype(np.float64)
    right = rng.random(n) < 0.6
    peak = np.where(right, np.where(rot == 1, rng.uniform(0.22, 0.34, n), rng.uniform(0.40, 0.70, n)),
                    np.where(rot == 1, rng.uniform(0.05, 0.15, n), rng.uniform(0.20, 0.36, n)))
    inl = rng.integers(3, 8, n).astype(np.float64)
    ev = Evidence(inl, np.full(n, 64.0), peak, np.where(right, 1.0, 3000.0), rot)
    d = choose_decider(ev)
    assert d["chosen"] == "confidence+rotation" and d["confidence"].uses_rotation
    cv = d["cv"]
    assert cv["confidence+rotation"]["good"] > cv["confidence"]["good"] + 0.1 * right.sum()
    m = d["confidence"]
    assert m.probability(5, 64, 0.28, 1.0)[0] > m.threshold > m.probability(5, 64, 0.28, 0.0)[0]
    # decide() passes the heading search of the settings
    from cmpc.localize.georef import decide
    from cmpc.localize.scene import SceneSettings

    assert decide(SceneSettings(rotation_range_deg=15.0, confidence=m), 5, 64, 0.28)[0]
    assert not decide(SceneSettings(rotation_range_deg=0.0, confidence=m), 5, 64, 0.28)[0]


def test_a_decision_calibrated_with_another_embedder_is_not_used(tmp_path, capsys) -> None:
    """The answers a decision was calibrated on are one embedder's: another embedder gets the
    uncalibrated defaults and one warning line saying why; files without the record are used."""
    from cmpc.localize.georef import DECISION_FILE, load_decision
    from cmpc.localize.scene import SceneSettings

    rec = {"min_inliers": 9, "min_inlier_frac": 0.5, "min_fine_peak": 0.7, "embedder_sha256": "a" * 64}
    (tmp_path / DECISION_FILE).write_text(json.dumps(rec))
    s, src = load_decision(tmp_path, SceneSettings(), embedder_sha256="a" * 64)
    assert (s.min_inliers, s.min_inlier_frac, s.min_fine_peak) == (9, 0.5, 0.7)
    assert capsys.readouterr().err == ""
    s, src = load_decision(tmp_path, SceneSettings(), embedder_sha256="b" * 64)
    d = SceneSettings()
    assert (s.min_inliers, s.min_inlier_frac, s.min_fine_peak) == (d.min_inliers, d.min_inlier_frac, d.min_fine_peak)
    assert src["source"].startswith("default (uncalibrated)") and "aaaaaaaaaaaa" in src["source"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "cmpc train scene" in err[0]
    del rec["embedder_sha256"]  # a file from before the record: cannot tell, used
    (tmp_path / DECISION_FILE).write_text(json.dumps(rec))
    s, _ = load_decision(tmp_path, SceneSettings(), embedder_sha256="b" * 64)
    assert s.min_inliers == 9


def test_a_decision_calibrated_on_another_reference_spacing_is_refused(tmp_path) -> None:
    """Inlier counts scale with how densely the map is indexed: a decision calibrated at one
    reference spacing is refused on a map indexed at another (a 531 m decision on a 266 m map,
    e.g. built with --stride-px 32), with the spacing to build at; within 10 % it is used, and
    so is a file from before the record."""
    from cmpc.localize.georef import DECISION_FILE, load_decision
    from cmpc.localize.scene import SceneSettings

    rec = {"min_inliers": 9, "min_inlier_frac": 0.5, "min_fine_peak": 0.7, "ref_stride_m": 531.0}
    (tmp_path / DECISION_FILE).write_text(json.dumps(rec))
    with pytest.raises(DataError, match=r"266 m apart .* every 531 m.*--stride-px = 531 m / the map's GSD") as e:
        load_decision(tmp_path, SceneSettings(), ref_stride_m=265.9)
    assert "\n" not in str(e.value)
    s, _ = load_decision(tmp_path, SceneSettings(), ref_stride_m=531.0 * 1.09)
    assert s.min_inliers == 9
    with pytest.raises(DataError):
        load_decision(tmp_path, SceneSettings(), ref_stride_m=531.0 * 1.11)
    s, _ = load_decision(tmp_path, SceneSettings())  # spacing unknown (a one-reference map): used
    assert s.min_inliers == 9
    del rec["ref_stride_m"]
    (tmp_path / DECISION_FILE).write_text(json.dumps(rec))
    s, _ = load_decision(tmp_path, SceneSettings(), ref_stride_m=265.9)
    assert s.min_inliers == 9


def test_a_denser_map_is_searched_on_the_decisions_lattice() -> None:
    """A map indexed at 32 px (266 m) for patch queries, decision calibrated at 64 px (532 m):
    scenes search every 2nd column and row of each source map's grid, counted from its west
    column and north row; ratios that are not an integer 2..4, and irregular maps, get None
    (load_decision then refuses with the spacing to build at)."""
    from cmpc.localize.georef import calibrated_stride_m, decision_lattice

    def grid(x0: float, y0: float, nx: int, ny: int, s: float) -> np.ndarray:
        xs, ys = np.meshgrid(x0 + s * np.arange(nx), y0 - s * np.arange(ny))
        return np.stack([xs.ravel(), ys.ravel()], 1)

    a, b = grid(1000.0, 9000.0, 7, 5, 266.0), grid(50_000.0, 9133.0, 4, 4, 266.0)  # second map on another phase
    pos, src = np.concatenate([a, b]), np.repeat([0, 1], [len(a), len(b)])
    rows, spacing = decision_lattice(pos, src, 266.0, 532.0)
    # map a: columns 0, 2, 4, 6 x rows 0, 2, 4 = 12; map b: columns 0, 2 x rows 0, 2 = 4
    assert len(rows) == 16 and spacing == pytest.approx(532.0)
    ra, rb = pos[rows[rows < len(a)]], pos[rows[rows >= len(a)]]
    assert set(np.unique(ra[:, 0])) == {1000.0, 1532.0, 2064.0, 2596.0} and set(np.unique(ra[:, 1])) == {9000.0, 8468.0, 7936.0}
    assert set(np.unique(rb[:, 0])) == {50_000.0, 50_532.0} and set(np.unique(rb[:, 1])) == {9133.0, 8601.0}
    rows3, spacing3 = decision_lattice(grid(0.0, 0.0, 10, 10, 100.0), None, 100.0, 300.0)
    assert len(rows3) == 16 and spacing3 == pytest.approx(300.0)
    assert decision_lattice(pos, src, 266.0, 399.0) is None  # 1.5x: no lattice
    assert decision_lattice(pos, src, 266.0, 266.0 * 6) is None  # too sparse a lattice
    jitter = a + np.random.default_rng(0).uniform(-100, 100, a.shape)
    assert decision_lattice(jitter, None, 266.0, 532.0) is None  # not a regular grid
    assert calibrated_stride_m("/nonexistent") is None


def test_peak_margin_feature_claims_scenes_few_tiles_agree_on(tmp_path) -> None:
    """Small scenes found by the whole-map dense search: right ones stand far above the next
    place (large margin) though 0-2 tiles agree; wrong ones have as few tiles, peaks as high
    and small margins. Only a margin model claims them; it records that it needs no tiles,
    survives the decision file, and decide() passes the margin."""
    rng = np.random.default_rng(5)
    n = 300
    right = rng.random(n) < 0.6
    inl = rng.integers(0, 3, n).astype(np.float64)
    peak = rng.uniform(0.35, 0.7, n)
    margin = np.where(right, rng.uniform(0.12, 0.45, n), rng.uniform(-0.05, 0.06, n))
    ev = Evidence(inl, np.full(n, 9.0), peak, np.where(right, 1.0, 3000.0), np.zeros(n), margin)
    d = choose_decider(ev)
    assert d["chosen"] == "confidence+margin" and d["confidence"].uses_margin and d["confidence"].min_inliers == 0
    cv = d["cv"]
    assert cv["confidence+margin"]["good"] >= 0.9 * right.sum() and cv["confidence+margin"]["false"] <= 0.02 * n
    assert cv["confidence"]["good"] < 0.5 * right.sum()  # without the margin, 2 agreeing tiles are needed and peaks overlap
    m = d["confidence"]
    again = ConfidenceModel.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m and again.min_inliers == 0
    # a calibration file without margins (answered before the dense search): no margin model
    assert fit_confidence(Evidence(inl, np.full(n, 9.0), peak, ev.err, np.zeros(n), np.full(n, np.nan)), margin=True) is None
    from cmpc.localize.georef import decide
    from cmpc.localize.scene import SceneSettings

    s = SceneSettings(confidence=m)
    assert decide(s, 0, 9, 0.5, 0.3)[0]
    ok, why, _ = decide(s, 0, 9, 0.5, 0.0)
    assert not ok and "margin 0.000" in why
    assert not decide(s, 0, 9, 0.5, None)[0]  # no search ran: a margin of 0
    # the calibration answers keep the margin column (older files without it still load)
    from cmpc.train.scene import CALIBRATION_FILE, read_calibration_rows, write_calibration_rows

    rows = [{"method": "verify", "tiles_per_side": 2, "heading_range_deg": 0.0, "scene": "s.tif", "inliers": 1, "tiles": 9,
             "fine_peak": 0.5, "centre_m": 1.0, "peak_margin": 0.25}]
    write_calibration_rows(tmp_path / CALIBRATION_FILE, rows)
    assert read_calibration_rows(tmp_path / CALIBRATION_FILE)[0]["peak_margin"] == 0.25
    text = (tmp_path / CALIBRATION_FILE).read_text().splitlines()
    (tmp_path / CALIBRATION_FILE).write_text("\n".join(line.rsplit(",", 2)[0] for line in text) + "\n")  # a file from before margins and off-map scenes
    assert np.isnan(read_calibration_rows(tmp_path / CALIBRATION_FILE)[0]["peak_margin"])


def test_off_map_scenes_give_the_decision_something_wrong_to_learn_from(tmp_path) -> None:
    """Calibration scenes whose best placements are all right leave no logistic model to fit;
    mirrored copies (off-map scenes, every claim false) do: with them the margin model claims
    the right placements few tiles agree on and refuses the off-map ones."""
    import rasterio

    from cmpc.train.scene import mirror_scenes, read_calibration_rows, write_calibration_rows

    # mirror_scenes: values flipped left-right, mask and type kept, truth marked off-map
    src, dst = tmp_path / "cut", tmp_path / "off"
    src.mkdir()
    a = np.arange(4 * 6, dtype=np.uint8).reshape(1, 4, 6)
    for k in range(3):
        with rasterio.open(src / f"scene_{k:04d}.tif", "w", driver="GTiff", width=6, height=4, count=1, dtype="uint8") as f:
            f.write(a + k)
            f.write_mask(np.where(np.arange(6)[None, :] < 2, 0, 255).repeat(4, 0).astype(np.uint8))
        (src / f"scene_{k:04d}.truth.json").write_text(json.dumps({"scene": f"scene_{k:04d}.tif", "gsd_m": 1.0}))
    assert mirror_scenes(src, dst, 2) == 2 and sorted(p.name for p in dst.glob("*.tif")) == ["scene_0000.tif", "scene_0001.tif"]
    with rasterio.open(dst / "scene_0001.tif") as f:
        assert f.dtypes[0] == "uint8" and (f.read() == (a + 1)[:, :, ::-1]).all()
        assert (f.dataset_mask()[:, 4:] == 0).all() and (f.dataset_mask()[:, :4] == 255).all()
    assert json.loads((dst / "scene_0000.truth.json").read_text())["off_map"] is True
    # evidence: 150 right placements (few agreeing tiles, margins 0.1-0.5), 75 off-map (inf error)
    rng = np.random.default_rng(7)
    n_pos, n_neg = 150, 75
    inl = np.concatenate([rng.integers(0, 10, n_pos), rng.integers(0, 3, n_neg)]).astype(np.float64)
    peak = np.concatenate([rng.uniform(0.4, 0.75, n_pos), rng.uniform(0.15, 0.45, n_neg)])
    margin = np.concatenate([rng.uniform(0.1, 0.5, n_pos), rng.uniform(-0.05, 0.05, n_neg)])
    err = np.concatenate([rng.uniform(0.2, 3.0, n_pos), np.full(n_neg, np.inf)])
    rows = [{"method": "verify", "tiles_per_side": 2, "heading_range_deg": 0.0, "scene": f"s{i}", "inliers": int(inl[i]), "tiles": 64,
             "fine_peak": float(peak[i]), "centre_m": float(err[i]), "peak_margin": float(margin[i]), "off_map": int(i >= n_pos)}
            for i in range(n_pos + n_neg)]
    write_calibration_rows(tmp_path / "cal.csv", rows)
    back = read_calibration_rows(tmp_path / "cal.csv")
    ev = Evidence.of_rows(back)
    assert (ev.err[n_pos:] == 1e9).all() and np.isinf(back[-1]["centre_m"])
    assert fit_confidence(ev.subset(np.arange(n_pos))) is None  # positives only: nothing to learn
    d = choose_decider(ev)
    assert d["chosen"].startswith("confidence+margin")
    claims = confidence_claims(d["confidence"], ev)
    assert claims[:n_pos].mean() >= 0.95 and not claims[n_pos:].any()
    assert choose_rule(ev)["found_good"] < claims[:n_pos].sum()  # thresholds need 2 agreeing tiles
