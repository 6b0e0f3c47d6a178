"""Evaluation: metrics on hand-made rankings, metrics.json keys, plots, refiner plug-in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmpc.evaluate.metrics import (
    block_metrics,
    cmc_curve,
    count_higher,
    error_cdf,
    error_stats,
    exact_ranks,
    first_correct_position,
    mean_average_precision,
    recall_at_k,
)
from index_fixtures import evaluate_command, experiment, write_checkpoint, write_dataset


# --------------------------------------------------------------------------- pure metrics


def test_recall_and_map_on_hand_made_ranks():
    ranks = [1, 3, None]
    r = recall_at_k(ranks, [1, 5, 10, 20])
    assert r == pytest.approx({"1": 1 / 3, "5": 2 / 3, "10": 2 / 3, "20": 2 / 3})
    assert mean_average_precision(ranks) == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert cmc_curve(ranks, 4) == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert mean_average_precision([2, 2, 4, 4]) == pytest.approx(0.375)
    assert recall_at_k([], [1])["1"] is None and mean_average_precision([]) is None
    with pytest.raises(ValueError):
        recall_at_k([0, 1], [1])  # ranks are 1-based


def test_error_stats_on_known_errors():
    errors = np.array([0.5, 1.0, 3.0, 8.0, 30.0, 120.0, 250.0, 4.0, 6.0, 20.0, np.nan])  # NaN = no position
    s = error_stats(errors, [1, 2, 5, 10, 25, 50, 100, 200])
    finite = errors[np.isfinite(errors)]
    assert s["mean"] == pytest.approx(finite.mean())  # mean / median / P90: over the positioned queries
    assert s["median"] == pytest.approx(7.0)  # sorted: 0.5 1 3 4 6 | 8 20 30 120 250
    assert s["p90"] == pytest.approx(np.percentile(finite, 90))
    # within: the query without a position is a miss (11 queries in the denominator)
    assert s["within"] == pytest.approx({"1": 2 / 11, "2": 2 / 11, "5": 4 / 11, "10": 6 / 11, "25": 7 / 11, "50": 8 / 11, "100": 8 / 11, "200": 9 / 11})
    assert error_stats([], [1])["median"] is None
    cdf = error_cdf([1.0, 2.0, 4.0, 8.0], np.array([0.5, 1.0, 3.0, 8.0, 100.0]))
    assert cdf == pytest.approx([0.0, 0.25, 0.5, 1.0, 1.0])


def test_first_correct_position():
    retrieved = np.array([[5, 7, 9], [1, 2, 3], [4, 4, 8], [0, 1, 2]])
    true = np.array([9, 6, 4, -1])
    assert first_correct_position(retrieved, true).tolist() == [3.0, np.inf, 1.0, np.inf]


def test_exact_ranks_streaming_matches_sorting():
    # Unit vectors at known angles: the query at 0 rad scores cos(angle) with each reference.
    angles = np.array([0.3, 0.1, 1.0, 0.2, 2.0, 0.05])
    refs = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    ref_ids = np.array([10, 11, 12, 13, 14, 15])
    q = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    qids = np.array([10, 12, 99])  # 99 is not in the map
    # scores descending: id15 (0.05), id11 (0.1), id13 (0.2), id10 (0.3), id12 (1.0), id14 (2.0)
    for chunk in (1, 2, 4, 100):
        assert exact_ranks(q, qids, refs, ref_ids, chunk_rows=chunk).tolist() == [4.0, 5.0, np.inf]
    allowed = np.array([True, False, True, False, True, True])  # drops id11 and id13
    chunks = [(0, refs[:3]), (3, refs[3:])]
    correct = np.array([np.cos(0.3), np.cos(1.0), -np.inf], dtype=np.float32)
    assert count_higher(q, qids, correct, chunks, ref_ids, allowed)[:2].tolist() == [1, 2]
    # the correct reference itself never counts, even if its score were recomputed lower
    assert count_higher(q[:1], qids[:1], correct[:1] - 1e-6, [(0, refs)], ref_ids).tolist() == [3]


def test_block_metrics_keys():
    b = block_metrics(np.array([1.0, 2.0, np.inf]), np.array([0.0, 5.0, 50.0]), [1, 5, 10, 20], [1, 2, 5, 10, 25, 50, 100, 200], 20)
    assert set(b) >= {"recall", "mAP", "error_m"}
    assert set(b["recall"]) == {"1", "5", "10", "20"}
    assert set(b["error_m"]) == {"mean", "median", "p90", "within"}
    assert set(b["error_m"]["within"]) == {"1", "2", "5", "10", "25", "50", "100", "200"}
    assert len(b["cmc"]) == 20 and b["cmc"][0] == pytest.approx(1 / 3) and b["cmc"][1] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- end to end

DESIGN_BLOCK = {"recall", "mAP", "error_m"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_world")
    info = write_dataset(root / "ds", grid=4, non_aligned=5)
    write_checkpoint(root / "ck.pt", seed=0)
    write_checkpoint(root / "ck2.pt", seed=1)
    return root, info


@pytest.mark.slow
def test_evaluate_writes_design_metrics_and_plots(world, monkeypatch):
    from cmpc.localize.localizer import Localizer

    root, info = world
    monkeypatch.chdir(root)
    exp = experiment("ev", "ds", "eval.out=rep")
    m = evaluate_command(exp, checkpoint="ck.pt")  # no index yet: the index step builds it first
    saved = json.loads((root / "rep" / "metrics.json").read_text())
    assert saved["aligned"]["coarse"]["recall"] == m["aligned"]["coarse"]["recall"]
    assert set(saved) == {"meta", "aligned", "non_aligned"}
    assert {"dataset", "split", "checkpoint", "config"} <= set(saved["meta"])
    assert saved["meta"]["checkpoint_hash"] and saved["meta"]["config"]["name"] == "ev"
    for qset, n in (("aligned", 16), ("non_aligned", 5)):
        block = saved[qset]
        assert block["n_queries"] == n
        assert "refined" not in block  # no refiner in this experiment
        assert DESIGN_BLOCK <= set(block["coarse"])
        assert set(block["coarse"]["recall"]) == {"1", "5", "10", "20"}
        assert set(block["coarse"]["error_m"]["within"]) == {"1", "2", "5", "10", "25", "50", "100", "200"}
    for png in ("cmc.png", "error_cdf.png", "retrieval_grid.png", "error_map.png"):
        data = (root / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # ck.pt is not the experiment's runs/ev/emb_best.pt: its index is index/ev@<hash[:12]>
    from pathlib import Path

    from cmpc.models.checkpoint import checkpoint_hash

    assert saved["meta"]["index"] == str(Path("index") / f"ev@{checkpoint_hash(root / 'ck.pt')[:12]}")
    assert (root / saved["meta"]["index"] / "manifest.json").is_file()

    # The numbers, recomputed independently: brute-force ranks over the model's embeddings.
    loc = Localizer.from_experiment(exp, "ck.pt", index_dir=saved["meta"]["index"])
    from cmpc.data.patches import PatchDataset

    q = PatchDataset("ds", "test", "sar", 16)
    x = torch.stack([q[i][0] for i in range(len(q))])
    emb = loc.embed(x)
    qids = np.array([a.id for a in q.annotations])
    ranks = exact_ranks(emb, qids, loc.index.features, loc.index.ids)
    aligned = np.array([a.aligned for a in q.annotations])
    for qset, mask in (("aligned", aligned), ("non_aligned", ~aligned)):
        got = saved[qset]["coarse"]
        for k in ("1", "5", "10", "20"):
            assert got["recall"][k] == pytest.approx(np.mean(ranks[mask] <= int(k)))
        assert got["mAP"] == pytest.approx(np.mean(1 / ranks[mask]))
        # coarse position = centre of the top-1 reference by brute force
        top1 = np.argmax(emb[mask] @ loc.index.features.T, axis=1)
        true_xy = np.array([[a.x, a.y] for a, keep in zip(q.annotations, mask) if keep])
        err = np.hypot(*(loc.index.positions[top1] - true_xy).T)
        assert got["error_m"]["mean"] == pytest.approx(err.mean())
        assert got["error_m"]["median"] == pytest.approx(np.median(err))


def test_evaluate_rebuilds_a_stale_index(world, monkeypatch, capsys):
    import shutil
    from pathlib import Path

    from cmpc.cli import main
    from cmpc.index.store import read_manifest
    from cmpc.models.checkpoint import checkpoint_hash

    root, _ = world
    monkeypatch.chdir(root)
    exp = experiment("stale", "ds", "eval.out=rep_stale", "eval.query_sets=[\"all\"]", "eval.plots=false")
    exp.save(root / "stale.json")
    h1, h2 = checkpoint_hash(root / "ck.pt"), checkpoint_hash(root / "ck2.pt")
    (root / "runs" / "stale").mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "ck.pt", root / "runs" / "stale" / "emb_best.pt")
    assert main(["test", "stale.json"]) == 0  # = python test.py stale.json
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"all"} and printed["all"]["n_queries"] == 21
    assert read_manifest(root / "index" / "stale")["checkpoint"]["hash"] == h1
    shutil.copy2(root / "ck2.pt", root / "runs" / "stale" / "emb_best.pt")  # retrained: the index must follow it
    m = evaluate_command(exp)
    assert read_manifest(root / "index" / "stale")["checkpoint"]["hash"] == h2
    assert m["meta"]["index_rebuilt"] is True
    # Another checkpoint than the experiment's gets its own index; the experiment's stays.
    m_old = evaluate_command(exp, checkpoint="ck.pt")
    assert m_old["meta"]["index"] == str(Path("index") / f"stale@{h1[:12]}")
    assert read_manifest(root / "index" / "stale")["checkpoint"]["hash"] == h2
    assert set(m) == {"meta", "all"} and m["all"]["n_queries"] == 21
    assert not (root / "rep_stale" / "cmc.png").exists()  # eval.plots=false


def test_oracle_model_localizes_aligned_queries_exactly(tmp_path, monkeypatch):
    """SAR = optical pixels and equal stems: every aligned query must come back at rank 1, 0 m."""
    write_dataset(tmp_path / "ds", grid=4, non_aligned=3, sar_equals_optical=True, seed=3)
    write_checkpoint(tmp_path / "oracle.pt", sar_channels=3, tie_stems=True)
    monkeypatch.chdir(tmp_path)
    m = evaluate_command(experiment("oracle", "ds", "eval.out=rep", "eval.plots=false"), checkpoint="oracle.pt")
    a = m["aligned"]["coarse"]
    assert a["recall"]["1"] == 1.0 and a["mAP"] == 1.0
    assert a["error_m"]["mean"] == 0.0 and a["error_m"]["within"]["1"] == 1.0
    # predictions.csv: every aligned query's top-1 is its own reference
    rows = [line.split(",") for line in (tmp_path / "rep" / "predictions.csv").read_text().splitlines()]
    head = rows[0]
    for r in rows[1:]:
        if r[head.index("query")].startswith("a"):
            assert r[head.index("top1_id")] == r[head.index("true_id")]
            assert float(r[head.index("top1_score")]) == pytest.approx(1.0, abs=1e-4)


class ReverseRefiner:
    """A test refiner: reverses the top-k and moves the position 1 m east of the new first."""

    def refine(self, query_emb, topk_rows, topk_scores, index, query_images):
        assert query_emb.shape[0] == topk_rows.shape[0] == topk_scores.shape[0] == query_images.shape[0]
        order = topk_rows[:, ::-1].copy()
        pos = index.positions[order[:, 0]] + np.array([1.0, 0.0])
        return order, pos


def test_refiner_plugs_into_localizer_and_report(world, monkeypatch, tmp_path):
    from cmpc.evaluate.ranks import GroundTruthScorer, ground_truth_ranks
    from cmpc.evaluate.report import write_report
    from cmpc.localize.localizer import Localizer
    from cmpc.localize.queries import AnnotationQueries
    from cmpc.localize.run import run_queries

    root, _ = world
    monkeypatch.chdir(root)
    exp = experiment("ref", "ds", "eval.plots=false")
    from cmpc.index.build import build_index

    build_index(exp, checkpoint="ck.pt")
    base = Localizer.from_experiment(exp, "ck.pt")
    loc = Localizer(base.model, base.index, top_k=5, refiner=ReverseRefiner())
    src = AnnotationQueries(root / "ds", "test", loc.img_size)
    batch = next(src.batches(6))
    res = loc.localize_batch(batch.x)
    assert res.refined and np.array_equal(res.refined_rows, res.rows[:, ::-1])
    assert np.allclose(res.refined_xy, loc.index.positions[res.rows[:, -1]] + [1.0, 0.0])
    coarse, refined = ground_truth_ranks(loc.index, res, batch.true_ids, loc.allowed_mask)
    for i in range(len(batch)):
        if np.isfinite(coarse[i]) and coarse[i] <= 5:
            assert refined[i] == 6 - coarse[i]  # reversed order
        else:
            assert refined[i] == coarse[i]

    records, stats = run_queries(loc, src, tmp_path / "out", batch_size=7, grid_queries=2, scorer=GroundTruthScorer(exp.eval, 5))
    assert stats["queries"] == 21
    m = write_report(records, tmp_path / "out", {"dataset": "ds", "split": "unknown", "checkpoint": "ck.pt", "config": {}}, exp.eval, loc.index, 5)
    for qset in ("aligned", "non_aligned"):
        assert DESIGN_BLOCK <= set(m[qset]["refined"])
        # refined error = distance to (reversed top-1 + 1 m): differs from coarse
        assert m[qset]["refined"]["error_m"]["mean"] != m[qset]["coarse"]["error_m"]["mean"]
    head = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert {"refined_x", "refined_y", "refined_rank", "refined_error_m"} <= set(head)


def test_sn6_style_dataset_without_extensions(tmp_path, monkeypatch):
    """Annotations with only id/pos/file_path (no bounds, gsd, crs, aligned): footprints are
    estimated from the grid spacing, and an empty query set still has every key."""
    from cmpc.data.layout import read_annotations, write_annotation

    write_dataset(tmp_path / "ds", grid=3, non_aligned=0, with_bounds=False, crs=None)
    for mode in ("opt", "sar"):  # strip the extensions this project adds
        for a in read_annotations(tmp_path / "ds", "test", mode):
            a.aligned = a.gsd = a.bounds = a.crs = None
            write_annotation(tmp_path / "ds", "test", mode, a)
    write_checkpoint(tmp_path / "runs" / "sn6" / "emb_best.pt")
    monkeypatch.chdir(tmp_path)
    m = evaluate_command(experiment("sn6", "ds", "eval.plots=false"))
    man = json.loads((tmp_path / "index" / "sn6" / "manifest.json").read_text())
    assert man["crs"] is None and man["patch_m"] == 16.0 and man["patch_m_source"].startswith("estimated")
    assert m["meta"]["split"] == "unknown"
    assert m["aligned"]["n_queries"] == 9  # no flag counts as aligned
    empty = m["non_aligned"]
    assert empty["n_queries"] == 0 and set(empty["coarse"]["recall"]) == {"1", "5", "10", "20"}
    saved = json.loads((tmp_path / "reports" / "sn6" / "metrics.json").read_text())
    assert saved["non_aligned"]["coarse"]["mAP"] is None and saved["non_aligned"]["coarse"]["error_m"]["median"] is None
