"""Scene graph GNN: graph construction, learning to prefer a consistent placement, checkpoints.

Candidate sets are made by hand: an n x n tile grid (stride 64 m) whose right candidates
sit at one placement on a map (at a random rank, not always first) while the other
candidates are look-alikes scattered over the map, some with higher cosines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmpc.errors import CheckpointError
from cmpc.models.scene_graph import (
    EDGE_DIM,
    NODE_DIM,
    SceneGraphNet,
    batch_graphs,
    build_scene_graph,
    load_scene_graph,
    rescore_candidates,
    save_scene_graph,
)

STRIDE = 64.0


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    rc = np.array([(i, j) for i in range(n) for j in range(n)], dtype=np.int64)
    return rc, np.zeros(len(rc))


def _scene(n: int, k: int, rng: np.random.Generator, right_frac: float = 0.8) -> tuple[np.ndarray, ...]:
    """grid_rc, heading, scores (T, k) sorted, positions (T, k, 2), labels (T, k)."""
    rc, hd = _grid(n)
    T = len(rc)
    origin = rng.uniform(1000, 3000, size=2).round(-1)
    true = origin + np.stack([rc[:, 1] * STRIDE, -rc[:, 0] * STRIDE], 1)
    pos = rng.uniform(0, 4000, size=(T, k, 2))
    scores = np.sort(rng.uniform(0.3, 0.7, size=(T, k)), axis=1)[:, ::-1].copy()
    labels = np.zeros((T, k))
    for t in range(T):
        if rng.random() < right_frac:
            r = int(rng.integers(0, k))
            pos[t, r] = true[t] + rng.normal(0, 3, 2)
            labels[t, r] = 1
    return rc, hd, scores, pos, labels


def test_graph_edges_and_zero_discrepancy() -> None:
    rc, hd = _grid(2)  # 4 tiles, all mutual 8-neighbours: 12 ordered tile pairs
    k = 3
    true = np.array([[0.0, 0.0], [STRIDE, 0.0], [0.0, -STRIDE], [STRIDE, -STRIDE]]) + 500.0
    pos = np.stack([true + 1000.0 * (r + 1) * np.array([1.0, 0.3]) for r in range(k)], 1)  # (T, k, 2)
    pos[:, 0] = true  # rank 0 = the consistent placement
    scores = np.tile(np.array([0.9, 0.8, 0.7]), (4, 1))
    g = build_scene_graph(rc, hd, scores, pos, STRIDE, max_disc=float("inf"))
    assert g.x.shape == (12, NODE_DIM)
    assert g.edge_index.shape == (2, 12 * k * k)
    assert g.edge_attr.shape == (12 * k * k, EDGE_DIM)
    src, dst = g.edge_index
    both_first = (g.rank[src] == 0) & (g.rank[dst] == 0)
    assert int(both_first.sum()) == 12
    assert torch.allclose(g.edge_attr[both_first], torch.zeros(12, EDGE_DIM), atol=1e-6)
    # the rank-1 candidates are one consistent placement too (a shifted copy): zero as well
    same = (g.rank[src] == g.rank[dst])
    assert torch.allclose(g.edge_attr[same], torch.zeros(int(same.sum()), EDGE_DIM), atol=1e-5)
    assert bool((g.edge_attr[~same][:, 2] > 1.0).all())
    # pruned graph: only agreeing edges remain
    gp = build_scene_graph(rc, hd, scores, pos, STRIDE, max_disc=1.5)
    assert gp.edge_index.shape[1] == 12 * k
    # tiles of different heading hypotheses are never neighbours
    g2 = build_scene_graph(rc, np.array([0.0, 0.0, 5.0, 5.0]), scores, pos, STRIDE, max_disc=float("inf"))
    assert g2.edge_index.shape[1] == 4 * k * k


def test_gnn_ranks_consistent_placement_first() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    k = 8
    train = []
    for _ in range(60):
        rc, hd, sc, pos, lab = _scene(int(rng.integers(2, 5)), k, rng)
        train.append(build_scene_graph(rc, hd, sc, pos, STRIDE, labels=lab))
    model = SceneGraphNet(hidden=16, layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, ei, ea, y = batch_graphs(train)
    pw = (1 - y).sum() / y.sum()
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x, ei, ea), y, pos_weight=pw)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hits = coarse = n = 0
    for _ in range(20):
        rc, hd, sc, pos, lab = _scene(3, k, rng)
        rows = np.tile(np.arange(k), (len(rc), 1))
        new_rows, logits, order = rescore_candidates(model, rc, hd, rows, sc, pos, STRIDE)
        has = lab.sum(1) > 0
        hits += int(np.take_along_axis(lab, order, 1)[has, 0].sum())
        coarse += int(lab[has, 0].sum())
        n += int(has.sum())
        assert (np.diff(logits, axis=1) <= 1e-6).all()
    assert hits / n > 0.9, (hits, n)
    assert hits > coarse + 0.5 * n  # coarse order alone has the right one first ~1/k of the time


def test_checkpoint_weights_only_and_provenance(tmp_path) -> None:
    emb = tmp_path / "emb.pt"
    emb.write_bytes(b"embedder A")
    other = tmp_path / "other.pt"
    other.write_bytes(b"embedder B")
    from cmpc.utils import provenance

    model = SceneGraphNet(hidden=8, layers=1)
    p = save_scene_graph(tmp_path / "sg.pt", model, provenance.record(emb), {"max_disc": 1.5})
    ck = torch.load(p, map_location="cpu", weights_only=True)
    assert ck["inputs"]["embedder"]["sha256"] == provenance.record(emb)["sha256"]
    m2, _ = load_scene_graph(p, emb)
    x = torch.randn(5, NODE_DIM)
    ei = torch.tensor([[0, 1], [1, 2]])
    ea = torch.randn(2, EDGE_DIM)
    assert torch.allclose(m2(x, ei, ea), model.eval()(x, ei, ea))
    with pytest.raises(CheckpointError, match="embedder"):
        load_scene_graph(p, other)
    with pytest.raises(CheckpointError):
        load_scene_graph(tmp_path / "missing.pt", emb)


def test_decision_file_per_method_rule_and_default(tmp_path) -> None:
    import json

    from cmpc.localize.georef import DECISION_FILE, load_decision
    from cmpc.localize.scene import SceneSettings

    (tmp_path / DECISION_FILE).write_text(json.dumps({
        "min_inliers": 2, "min_inlier_frac": 0.3, "min_fine_peak": 0.275,
        "methods": {"gnn+verify": {"min_inliers": 3, "min_inlier_frac": 0.25, "min_fine_peak": 0.2}},
        "default_method": {"method": "gnn+verify"},
    }))
    s, src = load_decision(tmp_path, SceneSettings())
    assert (s.min_inliers, s.min_fine_peak, src["default_method"]) == (2, 0.275, "gnn+verify")
    g, _ = load_decision(tmp_path, SceneSettings(), method="gnn+verify")
    assert (g.min_inliers, g.min_inlier_frac, g.min_fine_peak) == (3, 0.25, 0.2)
