"""Scene graphs over the top-k coarse candidates of each query.

One graph per query: a node per candidate reference, edges between candidates that are near
each other on the map (k nearest by position) and between candidates that look alike (k most
similar embeddings). The graphs of a batch of queries are built at once with torch (no
pyg-lib / torch-cluster) and returned as one :class:`torch_geometric.data.Batch`. They are
the input of :class:`cmpc.models.refiner.SceneGraphRefiner`, built the same way at query
time (:mod:`cmpc.localize.refine`) and in training (:mod:`cmpc.train.refine`).

Node features (``node_dim(D) = 3 D + 4`` columns, in this order)::

    query embedding (D) | candidate embedding (D) | their product (D) |
    cosine similarity (1) | position relative to the top-1, x and y in units of the
    reference spacing (2) | rank / (k - 1) (1)

Edge ``j -> i`` (``edge_index[0] = j`` source, ``edge_index[1] = i`` target: node ``i``
receives messages from its neighbours ``j``). Edge attributes (``EDGE_DIM = 6`` columns)::

    (x_j - x_i, y_j - y_i, |p_j - p_i|) / spacing | 1 - cos(c_i, c_j) | spatial flag | feature flag

An edge found by both kNN rules appears once with both flags set. Ties (candidates on a grid
have many equal distances) are broken by coarse rank, so edge lists are deterministic.

Positions are divided by ``spacing_m`` (the reference grid spacing, metres) so one trained
refiner works at any ground resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_geometric.data import Batch

EDGE_DIM = 6


def node_dim(embed_dim: int) -> int:
    """Width of the node features for embeddings of dimension ``embed_dim``."""
    return 3 * embed_dim + 4


@dataclass
class CandidateGraphs:
    """A batch of candidate graphs and how its nodes map back to the (B, k) candidate table.

    ``batch``: the torch_geometric Batch (``x`` (N, node_dim), ``edge_index`` (2, E),
    ``edge_attr`` (E, EDGE_DIM), ``batch`` (N,), ``ptr`` (B+1,), ``rel_pos`` (N, 2) in
    spacing units). ``slot``: (N,) flat index ``b * k + j`` of each node in the (B, k) table.
    ``valid``: (B, k) bool, which candidates exist. ``spacing_m``: metres per position unit.
    """

    batch: Batch
    slot: torch.Tensor
    valid: torch.Tensor
    spacing_m: float

    @property
    def num_graphs(self) -> int:
        return int(self.valid.shape[0])

    @property
    def k(self) -> int:
        return int(self.valid.shape[1])


def _knn_table(dist: torch.Tensor, n: int, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``dist`` (B, k, k) the ``n`` smallest allowed columns, ties by column index.

    Returns ``(cols (B, k, n), ok (B, k, n) bool)``; ``ok`` is False where a row has fewer
    than ``n`` allowed neighbours.
    """
    big = torch.finfo(dist.dtype).max
    d = torch.where(allowed, dist, torch.full_like(dist, big))
    # stable sort: equal distances keep column (= coarse rank) order
    order = torch.sort(d, dim=-1, stable=True).indices[..., :n]
    ok = torch.gather(allowed, -1, order)
    return order, ok


def knn_pairs(dist: torch.Tensor, n: int, valid: torch.Tensor) -> torch.Tensor:
    """Directed kNN pairs within each graph.

    ``dist``: (B, k, k) distances (smaller = nearer); ``valid``: (B, k) bool. Returns a
    (P, 3) long tensor of ``(b, i, j)``: ``j`` is one of the ``n`` nearest valid neighbours of
    valid node ``i`` (never ``i`` itself) in graph ``b``.
    """
    B, k, _ = dist.shape
    n = min(n, k - 1)
    if n <= 0:
        return torch.zeros((0, 3), dtype=torch.long, device=dist.device)
    eye = torch.eye(k, dtype=torch.bool, device=dist.device)
    allowed = valid[:, :, None] & valid[:, None, :] & ~eye
    cols, ok = _knn_table(dist, n, allowed)
    b = torch.arange(B, device=dist.device)[:, None, None].expand(B, k, n)
    i = torch.arange(k, device=dist.device)[None, :, None].expand(B, k, n)
    return torch.stack([b[ok], i[ok], cols[ok]], dim=1)


def build_graphs(
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    cand_pos_m: torch.Tensor,
    cand_sim: torch.Tensor,
    spacing_m: float,
    spatial_knn: int,
    feature_knn: int,
    valid: torch.Tensor | None = None,
    rank_den: int | None = None,
) -> CandidateGraphs:
    """Build the candidate graphs of a batch of queries.

    Args:
        query_emb: (B, D) query embeddings (unit vectors).
        cand_emb: (B, k, D) candidate reference embeddings, coarse rank order.
        cand_pos_m: (B, k, 2) candidate centres, metres (x east, y north).
        cand_sim: (B, k) coarse similarity of each candidate to its query.
        spacing_m: reference grid spacing, metres (positions are divided by it).
        spatial_knn: edges to the n nearest candidates by position (0 = none).
        feature_knn: edges to the n most similar candidates by embedding (0 = none).
        valid: (B, k) bool, False for padding (fewer than k candidates); the first
            candidate of every query must be valid. Default: all valid.
        rank_den: the rank feature is ``rank / rank_den``; default ``k - 1`` (a refiner
            passes its training k so the feature means the same at any query k).

    Returns:
        :class:`CandidateGraphs` holding the PyG Batch (only valid candidates are nodes).
    """
    if query_emb.ndim != 2 or cand_emb.ndim != 3 or cand_emb.shape[0] != query_emb.shape[0]:
        raise ValueError(f"expected query_emb (B, D) and cand_emb (B, k, D), got {tuple(query_emb.shape)} and {tuple(cand_emb.shape)}")
    B, k, D = cand_emb.shape
    if query_emb.shape[1] != D or cand_pos_m.shape != (B, k, 2) or cand_sim.shape != (B, k):
        raise ValueError("query_emb, cand_emb, cand_pos_m and cand_sim do not agree in shape")
    if spacing_m <= 0:
        raise ValueError(f"spacing_m must be > 0, got {spacing_m}")
    device = cand_emb.device
    if valid is None:
        valid = torch.ones((B, k), dtype=torch.bool, device=device)
    if B and not bool(valid[:, 0].all()):
        raise ValueError("the top-1 candidate of every query must be valid")
    q = query_emb.float()
    c = cand_emb.float()
    # padded slots may hold garbage (even NaN): zero them so they cannot leak into real nodes
    c = torch.where(valid[..., None], c, torch.zeros_like(c))
    pos = torch.where(valid[..., None], cand_pos_m.double(), cand_pos_m[:, :1].double().expand(B, k, 2))
    sim = torch.where(valid, cand_sim.float(), torch.zeros_like(cand_sim, dtype=torch.float32))
    rel = ((pos - pos[:, :1]) / spacing_m).float()  # (B, k, 2); float64 first: UTM metres are ~1e6
    den = float(rank_den if rank_den is not None else max(k - 1, 1))
    rank = (torch.arange(k, device=device, dtype=torch.float32) / den)[None, :, None].expand(B, k, 1)
    qe = q[:, None, :].expand(B, k, D)
    x_all = torch.cat([qe, c, qe * c, sim[..., None], rel, rank], dim=-1)  # (B, k, 3D+4)

    # ---- edges
    pdist = torch.cdist(rel, rel)  # (B, k, k) spacing units
    cn = torch.nn.functional.normalize(c, dim=-1)
    fdist = 1.0 - cn @ cn.transpose(1, 2)  # cosine distance
    pairs = []
    flags = []
    if spatial_knn > 0:
        p = knn_pairs(pdist, spatial_knn, valid)
        pairs.append(p)
        flags.append(torch.tensor([[1.0, 0.0]], device=device).expand(len(p), 2))
    if feature_knn > 0:
        p = knn_pairs(fdist, feature_knn, valid)
        pairs.append(p)
        flags.append(torch.tensor([[0.0, 1.0]], device=device).expand(len(p), 2))
    if pairs:
        bij = torch.cat(pairs)
        fl = torch.cat(flags)
        key = (bij[:, 0] * k + bij[:, 1]) * k + bij[:, 2]
        uniq, inv = torch.unique(key, return_inverse=True)  # sorted: by graph, then target, then source
        merged = torch.zeros((len(uniq), 2), device=device).index_add_(0, inv, fl).clamp_(max=1.0)
        b = uniq // (k * k)
        i = (uniq // k) % k
        j = uniq % k
    else:
        b = i = j = torch.zeros(0, dtype=torch.long, device=device)
        merged = torch.zeros((0, 2), device=device)
    d_xy = rel[b, j] - rel[b, i]
    d_len = pdist[b, i, j][:, None]
    d_feat = fdist[b, i, j][:, None]
    edge_attr = torch.cat([d_xy, d_len, d_feat, merged], dim=1).float()

    # ---- keep only valid nodes; renumber them globally
    flat_valid = valid.reshape(-1)
    slot = torch.nonzero(flat_valid).squeeze(1)  # (N,) b*k+j
    new_id = torch.full((B * k,), -1, dtype=torch.long, device=device)
    new_id[slot] = torch.arange(len(slot), device=device)
    src = new_id[b * k + j]
    dst = new_id[b * k + i]
    counts = valid.sum(dim=1)
    ptr = torch.zeros(B + 1, dtype=torch.long, device=device)
    ptr[1:] = torch.cumsum(counts, 0)
    batch_vec = torch.repeat_interleave(torch.arange(B, device=device), counts)
    data = Batch(
        x=x_all.reshape(B * k, -1)[slot],
        edge_index=torch.stack([src, dst]),
        edge_attr=edge_attr,
        rel_pos=rel.reshape(B * k, 2)[slot],
        batch=batch_vec,
        ptr=ptr,
    )
    data._num_graphs = B
    return CandidateGraphs(batch=data, slot=slot, valid=valid, spacing_m=float(spacing_m))


def grid_spacing_m(positions_m: torch.Tensor | np.ndarray, sample: int = 2048) -> float:
    """Typical spacing of a reference map, metres: the median nearest-neighbour distance.

    ``positions_m``: (N, 2) reference centres. Uses at most ``sample`` references (evenly
    picked) so it stays cheap on large maps. Returns 1.0 for maps of fewer than two
    distinct positions.
    """
    p = torch.as_tensor(positions_m, dtype=torch.float64)
    if len(p) < 2:
        return 1.0
    step = max(1, len(p) // sample)
    s = p[::step]
    d = torch.cdist(s, p)
    d[d <= 1e-9] = float("inf")  # self and duplicates
    nn = d.min(dim=1).values
    nn = nn[torch.isfinite(nn)]
    return float(nn.median()) if len(nn) else 1.0
