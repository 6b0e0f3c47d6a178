"""The scene-graph refiner: an attention GNN over the top-k candidates of a query.

Input: :class:`~cmpc.models.graph.CandidateGraphs` (one graph per query, a node per
candidate). A few GATv2 layers with edge features (pre-norm residual blocks) let every
candidate look at its spatial and visual neighbours. Two heads:

- **score**: one logit per candidate (reranking). It is the coarse cosine similarity times a
  learned gain plus a learned correction, so an untrained refiner keeps the coarse order.
- **position**: the query centre relative to the top-1 candidate (units of the reference
  spacing) as ``sum_i softmax(w)_i * rel_pos_i + offset``: a softmax-weighted mix of candidate
  positions (its own weights ``w``, not the score: ranking wants one peaked winner, position
  wants interpolation between neighbours) plus a learned offset from the pooled graph.

Trained with cross-entropy on the correct candidate plus a ranking margin, and a Huber loss on
the position (:func:`refiner_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_geometric.nn import GATv2Conv
from torch_geometric.utils import scatter, softmax

from cmpc.errors import ConfigError
from cmpc.models.graph import EDGE_DIM, CandidateGraphs, node_dim


def _sim_column(embed_dim: int) -> int:
    """Node-feature column of the coarse similarity (after q, c and q*c, D wide each)."""
    return 3 * embed_dim


@dataclass
class RefinerOutput:
    """What the GNN predicts for a batch of B queries with k candidate slots.

    ``scores``: (B, k) rerank logits, ``-inf`` at padded slots. ``weights``: (B, k) softmax
    position weights (0 at padded slots). ``mix``: (B, 2) weighted mix of candidate positions
    and ``offset``: (B, 2) learned offset; ``position``: (B, 2) = mix + offset. Positions are
    relative to the top-1 candidate in units of the reference spacing (multiply by
    ``spacing_m`` for metres).
    """

    scores: torch.Tensor
    weights: torch.Tensor
    mix: torch.Tensor
    offset: torch.Tensor
    position: torch.Tensor


def mix_positions(logits: torch.Tensor, rel_pos: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-weighted mix of node positions per graph.

    ``logits`` (N,), ``rel_pos`` (N, 2), ``batch`` (N,) graph of each node. Returns
    ``(mix (num_graphs, 2), weights (N,))`` with ``weights`` summing to 1 within each graph.
    """
    w = softmax(logits, batch, num_nodes=len(logits))
    mix = scatter(w[:, None] * rel_pos, batch, dim=0, dim_size=num_graphs, reduce="sum")
    return mix, w


class _Block(nn.Module):
    """Pre-norm residual block: x + GATv2(LN(x)); x + FFN(LN(x))."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.conv = GATv2Conv(hidden, hidden // heads, heads=heads, concat=True, edge_dim=EDGE_DIM, add_self_loops=True, fill_value="mean", dropout=dropout)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        x = x + self.conv(self.norm1(x), edge_index, edge_attr)
        return x + self.ffn(self.norm2(x))


class SceneGraphRefiner(nn.Module):
    """Attention GNN scoring candidates and regressing the query position.

    Args:
        embed_dim: D of the coarse embeddings (node features are ``3 D + 4`` wide).
        hidden: GNN width (divisible by ``heads``).
        layers: GATv2 blocks.
        heads: attention heads per block.
        dropout: attention dropout during training.
    """

    def __init__(self, embed_dim: int, hidden: int = 128, layers: int = 3, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"refine.hidden ({hidden}) must be divisible by refine.heads ({heads})")
        self.embed_dim = embed_dim
        self.inp = nn.Sequential(nn.Linear(node_dim(embed_dim), hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList([_Block(hidden, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(hidden)
        self.score_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.weight_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.offset_head = nn.Sequential(nn.Linear(2 * hidden + 2, hidden), nn.GELU(), nn.Linear(hidden, 2))
        # coarse-similarity gain: cosine gaps are ~0.01-0.1, logits need ~1
        self.sim_gain = nn.Parameter(torch.tensor(20.0))
        # start from "keep the coarse order" and "no offset"
        nn.init.zeros_(self.score_head[-1].weight)
        nn.init.zeros_(self.score_head[-1].bias)
        nn.init.zeros_(self.offset_head[-1].weight)
        nn.init.zeros_(self.offset_head[-1].bias)

    def forward(self, graphs: CandidateGraphs) -> RefinerOutput:
        g = graphs.batch
        B, k = graphs.num_graphs, graphs.k
        x = g.x
        if x.shape[1] != node_dim(self.embed_dim):
            raise ValueError(f"node features are {x.shape[1]} wide, the refiner expects {node_dim(self.embed_dim)}")
        sim = x[:, _sim_column(self.embed_dim)]
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, g.edge_index, g.edge_attr)
        h = self.norm(h)
        node_score = self.sim_gain * sim + self.score_head(h).squeeze(1)
        w_logit = self.weight_head(h).squeeze(1)
        mix, w = mix_positions(w_logit, g.rel_pos, g.batch, B)
        pooled_mean = scatter(h, g.batch, dim=0, dim_size=B, reduce="mean")
        pooled_w = scatter(w[:, None] * h, g.batch, dim=0, dim_size=B, reduce="sum")
        offset = self.offset_head(torch.cat([pooled_mean, pooled_w, mix], dim=1))
        scores = torch.full((B * k,), float("-inf"), device=x.device, dtype=node_score.dtype)
        scores[graphs.slot] = node_score
        weights = torch.zeros((B * k,), device=x.device, dtype=w.dtype)
        weights[graphs.slot] = w
        return RefinerOutput(scores.view(B, k), weights.view(B, k), mix, offset, mix + offset)


def refiner_loss(
    out: RefinerOutput,
    target: torch.Tensor,
    target_rel: torch.Tensor,
    rank_margin: float,
    position_weight: float,
    huber_beta: float = 0.1,
    position_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of the refiner for a batch.

    Args:
        out: the refiner's output for B queries.
        target: (B,) slot of the correct candidate, or -1 when it is not among the
            candidates (those queries train the position head only).
        target_rel: (B, 2) true query centre relative to the top-1, spacing units.
        rank_margin: hinge margin between the correct candidate's logit and every other's.
        position_weight: weight of the Huber position term.
        huber_beta: Huber transition, spacing units.
        position_mask: (B,) bool, queries that train the position head (default all);
            a query far from every candidate cannot be reached by their mix and would only
            teach the head a biased compromise.

    Returns ``(loss, parts)``; ``parts`` holds floats ``ce``, ``rank``, ``pos``, ``n_ce``.
    """
    has = target >= 0
    zero = out.scores.new_zeros(())
    ce = rank = zero
    if bool(has.any()):
        s = out.scores[has]
        t = target[has]
        ce = F.cross_entropy(s, t)
        s_t = s.gather(1, t[:, None])
        others = torch.isfinite(s)
        others[torch.arange(len(t)), t] = False
        hinge = F.relu(rank_margin - (s_t - s.masked_fill(~others, 0.0)))
        rank = (hinge * others).sum() / others.sum().clamp(min=1)
    per = F.smooth_l1_loss(out.position, target_rel.to(out.position.dtype), beta=huber_beta, reduction="none").sum(1)
    if position_mask is not None:
        per = per[position_mask]
    pos = per.mean() if per.numel() else zero
    loss = ce + rank + position_weight * pos
    parts = {"ce": float(ce.detach()), "rank": float(rank.detach()), "pos": float(pos.detach()), "n_ce": int(has.sum())}
    return loss, parts

