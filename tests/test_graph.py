"""Candidate-graph building on hand-made candidate sets with known neighbours."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmpc.models.graph import EDGE_DIM, build_graphs, grid_spacing_m, knn_pairs, node_dim


def _hand_made():
    """Two queries, k = 4. Query 0: candidates at (0,0), (64,0), (0,64), (200,200) m with
    embeddings whose nearest neighbours are known; query 1: three valid candidates + padding."""
    pos = torch.tensor(
        [
            [[0.0, 0.0], [64.0, 0.0], [0.0, 64.0], [200.0, 200.0]],
            [[0.0, 0.0], [0.0, 10.0], [0.0, 30.0], [float("nan"), float("nan")]],
        ],
        dtype=torch.float64,
    )
    pos[:, :, 0] += 500_000.0  # UTM-sized coordinates: relative positions must stay exact
    pos[:, :, 1] += 5_000_000.0
    c = torch.tensor(
        [
            [[1.0, 0, 0], [0, 1.0, 0], [0.8, 0.6, 0], [0, 0.8, 0.6]],
            [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [float("nan")] * 3],
        ]
    )
    q = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.0]])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    return q, c, pos, sim, valid


def _edges_of(g, b):
    """Edges of graph b as {(src_local, dst_local): attr list}."""
    bt = g.batch
    lo = int(bt.ptr[b])
    hi = int(bt.ptr[b + 1])
    out = {}
    for e in range(bt.edge_index.shape[1]):
        s, d = (int(v) for v in bt.edge_index[:, e])
        if lo <= d < hi:
            assert lo <= s < hi, "an edge crosses graphs"
            out[(s - lo, d - lo)] = [round(float(v), 4) for v in bt.edge_attr[e]]
    return out


def test_spatial_and_feature_edges_exact():
    q, c, pos, sim, valid = _hand_made()
    g = build_graphs(q, c, pos, sim, spacing_m=64.0, spatial_knn=1, feature_knn=1, valid=valid)
    e0 = _edges_of(g, 0)
    # spatial 1-NN (ties -> lower coarse rank): 0<-1, 1<-0, 2<-0, 3<-1
    # feature 1-NN by cosine: 0<-2, 1<-3, 2<-0, 3<-1
    flags = {k: v[4:] for k, v in e0.items()}
    assert flags == {
        (1, 0): [1.0, 0.0],
        (2, 0): [0.0, 1.0],
        (0, 1): [1.0, 0.0],
        (3, 1): [0.0, 1.0],
        (0, 2): [1.0, 1.0],  # found by both rules: one edge, both flags
        (1, 3): [1.0, 1.0],
    }
    # attributes of edge 1 -> 0: (dx, dy, dist) / spacing and 1 - cos
    assert e0[(1, 0)][:4] == [1.0, 0.0, 1.0, 1.0]
    d13 = math.hypot(64 - 200, 0 - 200) / 64
    assert e0[(1, 3)][:4] == pytest.approx([(64 - 200) / 64, (0 - 200) / 64, d13, 1 - 0.8], abs=1e-4)


def test_padding_is_masked_and_batched():
    q, c, pos, sim, valid = _hand_made()
    g = build_graphs(q, c, pos, sim, spacing_m=64.0, spatial_knn=2, feature_knn=0, valid=valid)
    bt = g.batch
    assert bt.num_graphs == 2
    assert bt.ptr.tolist() == [0, 4, 7]
    assert g.slot.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert bt.x.shape == (7, node_dim(3))
    assert bt.edge_attr.shape[1] == EDGE_DIM
    assert torch.isfinite(bt.x).all() and torch.isfinite(bt.edge_attr).all()
    # graph 1: positions 0, 10, 30 m on a line: 2-NN of each node = the two others
    assert set(_edges_of(g, 1)) == {(1, 0), (2, 0), (0, 1), (2, 1), (0, 2), (1, 2)}
    # node 2 of graph 1: similarity (column 3 D = 9), relative position (spacing units), rank
    assert bt.x[6, 9].item() == pytest.approx(0.3)
    assert bt.x[6, 10:12].tolist() == pytest.approx([0.0, 30.0 / 64])
    assert bt.x[6, 12].item() == pytest.approx(2 / 3)


def test_no_edges_and_fewer_candidates_than_knn():
    q, c, pos, sim, valid = _hand_made()
    g = build_graphs(q, c, pos, sim, 64.0, spatial_knn=0, feature_knn=0, valid=valid)
    assert g.batch.edge_index.shape == (2, 0)
    g = build_graphs(q, c, pos, sim, 64.0, spatial_knn=10, feature_knn=10, valid=valid)
    # every valid node connects to every other valid node of its graph, nothing more
    assert g.batch.edge_index.shape[1] == 4 * 3 + 3 * 2


def test_knn_pairs_ties_by_rank():
    d = torch.tensor([[[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]])
    p = knn_pairs(d, 2, torch.ones(1, 4, dtype=torch.bool))
    assert p.tolist() == [[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 2], [0, 2, 0], [0, 2, 1], [0, 3, 0], [0, 3, 1]]


def test_top1_must_be_valid_and_shapes_checked():
    q, c, pos, sim, valid = _hand_made()
    bad = valid.clone()
    bad[1, 0] = False
    with pytest.raises(ValueError, match="top-1"):
        build_graphs(q, c, pos, sim, 64.0, 1, 1, bad)
    with pytest.raises(ValueError):
        build_graphs(q[:, :2], c, pos, sim, 64.0, 1, 1, valid)


def test_grid_spacing():
    xs, ys = np.meshgrid(np.arange(5) * 64.0 + 500_000, np.arange(4) * 64.0)
    assert grid_spacing_m(np.stack([xs.ravel(), ys.ravel()], 1)) == pytest.approx(64.0)
    assert grid_spacing_m(np.zeros((1, 2))) == 1.0
