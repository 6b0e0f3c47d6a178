"""Score-fusion ensemble: the fusion algebra, Optuna weight tuning, and a run on tiny embedders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmpc.config import ModelConfig, experiment_from_dict
from cmpc.models.checkpoint import embedder_payload, save_checkpoint
from cmpc.models.embedder import build_embedder
from cmpc.translate.ensemble import fuse, fused_ranks, fused_top1, run_ensemble, tune_weights

from translate_world import experiment_dict, make_world


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def test_fusion_is_weighted_sum_of_cosines():
    rng = np.random.default_rng(0)
    q = [_unit(rng.normal(size=(5, 4))), _unit(rng.normal(size=(5, 6)))]
    r = [_unit(rng.normal(size=(7, 4))), _unit(rng.normal(size=(7, 6)))]
    w = np.array([0.3, 0.7])
    want = 0.3 * q[0] @ r[0].T + 0.7 * q[1] @ r[1].T
    assert np.allclose(fuse(q, w) @ fuse(r).T, want, atol=1e-6)
    assert np.array_equal(fused_top1(q, r, w), want.argmax(1))
    # Rank of the correct reference = 1 + number of references scoring higher.
    ids_r = np.arange(7)
    ids_q = np.array([0, 1, 2, 3, 4])
    ranks = fused_ranks(q, ids_q, r, ids_r, w)
    hand = 1 + (want > want[np.arange(5), ids_q][:, None]).sum(1)
    assert np.array_equal(ranks, hand)


def test_tuned_weights_pick_the_informative_member():
    rng = np.random.default_rng(1)
    n = 30
    refs = _unit(rng.normal(size=(n, 8)))
    good_q = _unit(refs + 0.05 * rng.normal(size=(n, 8)))  # member A: queries next to their reference
    noise_r, noise_q = _unit(rng.normal(size=(n, 8))), _unit(rng.normal(size=(n, 8)))  # member B: no signal
    q_ids = r_ids = np.arange(n)
    w, summary = tune_weights([good_q, noise_q], q_ids, [refs, noise_r], r_ids, trials=12, seed=0)
    ranks = fused_ranks([good_q, noise_q], q_ids, [refs, noise_r], r_ids, w)
    assert (ranks == 1).all() and w[0] > w[1]
    assert summary["trials"] >= 12 and summary["best_value"] == pytest.approx(1.0 + 1e-3, abs=1e-9)
    assert fused_ranks([good_q, noise_q], q_ids, [refs, noise_r], r_ids, np.array([0.0, 1.0])).mean() > 3


@pytest.mark.slow
def test_run_ensemble_on_tiny_embedders(tmp_path):
    paths = make_world(tmp_path)
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenetv3_small_050", embed_dim=16, stem_channels=8)
    members = []
    for k in range(3):
        torch.manual_seed(k)
        m = build_embedder(cfg, 1, 3).eval()
        p = tmp_path / "runs" / f"member{k}" / "emb_best.pt"
        save_checkpoint(p, embedder_payload(m, 32))
        members.append(str(p))
    raw = experiment_dict(paths, tmp_path, ensemble=members[:2], ensemble_trials=6)
    raw["train"] = {"val_fraction": 0.3, "device": "cpu"}
    exp = experiment_from_dict(raw)
    res = run_ensemble(exp, references=members[2:])
    assert set(res["test"]) == {"member0", "member1", "member2", "ensemble"}
    assert set(res["meta"]["weights"]) == {"member0", "member1"}  # the reference is reported, not fused
    assert sum(res["meta"]["weights"].values()) == pytest.approx(1.0)
    best_member = max(res["val"][m]["recall"]["1"] for m in ("member0", "member1"))
    assert res["val"]["ensemble"]["recall"]["1"] >= best_member
    b = res["test"]["ensemble"]["aligned"]
    assert b["n_queries"] == 21 and set(b["coarse"]) >= {"recall", "mAP", "error_m"}
    assert res["test"]["member0"]["non_aligned"]["n_queries"] == 21
    written = json.loads((tmp_path / "reports" / "translate_ensemble.json").read_text())
    assert written["meta"]["weights"] == res["meta"]["weights"]
    assert "| ensemble |" in (tmp_path / "reports" / "translate_ensemble.md").read_text()


@pytest.mark.slow
def test_select_checkpoint_trains_short_runs_and_writes_table(tmp_path):
    pytest.importorskip("cmpc.train.emb", reason="the embedder trainer is not in this checkout")
    from cmpc.translate.select import select_checkpoint
    from cmpc.translate.train import train_translator

    paths = make_world(tmp_path)
    raw = experiment_dict(paths, tmp_path, model="cyclegan", out=str(tmp_path / "cg"), epochs=2, max_steps_per_epoch=1, select_epochs=1, view_prob=0.5)
    raw["model"] = {"backbone": "mobilenetv3_small_050", "embed_dim": 16, "stem_channels": 8}
    raw["train"] = {"batch_size": 8, "val_fraction": 0.3, "max_steps_per_epoch": 2, "threads": 1, "hard_negatives": "none", "device": "cpu"}
    exp = experiment_from_dict(raw)
    train_translator(exp, progress=False)
    res = select_checkpoint(exp)
    assert [c["epoch"] for c in res["candidates"]] == [1, 2]
    assert res["best"] in {c["candidate"] for c in res["candidates"]}
    best = max(c["val_recall"]["1"] for c in res["candidates"])
    assert res["best_val_r1"] == best and 0.0 <= best <= 1.0
    assert res["gain_over_baseline"] == pytest.approx(best - res["baseline"]["val_recall"]["1"])
    md = (tmp_path / "reports" / "translate_select.md").read_text()
    assert "**(best)**" in md and "none (no translated views)" in md
    # A second call reuses the finished short runs instead of retraining them.
    again = select_checkpoint(exp)
    assert all(c["reused"] for c in again["candidates"]) and again["best"] == res["best"]
