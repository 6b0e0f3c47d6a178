"""Scene graph: rescoring a SAR scene's tile candidates by whether their neighbours agree.

A scene is cut into query tiles on a grid (one grid per heading hypothesis, tiles one
reference stride apart); every tile has a coarse top-k of reference candidates. The graph:

- **nodes**: (tile, candidate) pairs; features (:data:`NODE_DIM`): coarse cosine, rank / k,
  cosine gap to the tile's best, cosine minus the scene's mean top-1, the number of
  neighbouring tiles / 8;
- **edges**: between candidates of two neighbouring tiles of one heading hypothesis (grid
  offset at most 1 row and 1 column). The query grid implies the map offset of the two
  tiles, ``(dcol * stride, -drow * stride)`` metres (tiles are cut north-up in the map frame
  under their hypothesis); the two candidates' reference centres give the observed offset.
  Edge features (:data:`EDGE_DIM`): the discrepancy ``(dx, dy) / stride`` and
  ``|d| / stride``. Only edges with ``|d| <= max_disc * stride`` are kept (two candidates
  further apart than that disagree; leaving them out keeps a 4x4 rotated scene at a few
  thousand edges instead of ~10^5), so a candidate's in-degree counts its agreeing
  neighbours.

:class:`SceneGraphNet`: an input MLP, ``layers`` residual message-passing blocks
(:class:`AgreementConv`, a ``torch_geometric`` ``MessagePassing`` whose message is an MLP of
both ends and the edge's discrepancy, summed) and a logit per node: is this candidate within
one stride of the tile's true position. Graph construction is plain torch (no pyg-lib).

Checkpoints (:func:`save_scene_graph` / :func:`load_scene_graph`) are plain data (a state
dict of tensors, numbers, strings), loadable with ``torch.load(weights_only=True)``, and
record the embedder they were trained with (``inputs.embedder``, sha256); the loader refuses
another embedder (:func:`cmpc.utils.provenance.check`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch_geometric.nn import MessagePassing

from cmpc.errors import CheckpointError

NODE_DIM = 5
EDGE_DIM = 3
FORMAT = "cmpc-scene-graph"


@dataclass
class SceneGraph:
    """One scene's candidate graph. ``x`` (N, NODE_DIM); ``edge_index`` (2, E) source ->
    target; ``edge_attr`` (E, EDGE_DIM); ``tile`` (N,) tile of each node, ``rank`` (N,);
    ``y`` (N,) float labels or None; ``shape``: (T, k)."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    tile: torch.Tensor
    rank: torch.Tensor
    shape: tuple[int, int]
    y: torch.Tensor | None = None


def neighbour_tile_pairs(grid_rc: np.ndarray, heading_deg: np.ndarray) -> np.ndarray:
    """(P, 2) ordered pairs (a, b), a != b, of tiles of one heading hypothesis whose grid
    cells touch (8-neighbourhood)."""
    g = torch.as_tensor(np.asarray(grid_rc, dtype=np.int64))
    h = torch.as_tensor(np.asarray(heading_deg, dtype=np.float64))
    d = (g[:, None, :] - g[None, :, :]).abs().amax(-1)
    same = (h[:, None] - h[None, :]).abs() < 1e-6
    ok = same & (d == 1)
    return torch.nonzero(ok).numpy()


def build_scene_graph(
    grid_rc: np.ndarray,
    heading_deg: np.ndarray,
    scores: np.ndarray,
    positions_m: np.ndarray,
    stride_m: float,
    max_disc: float = 1.5,
    labels: np.ndarray | None = None,
) -> SceneGraph:
    """The graph of one scene (module doc). ``scores`` (T, k) cosines best first,
    ``positions_m`` (T, k, 2) candidate reference centres, ``labels`` (T, k) optional 0/1.
    ``max_disc`` = inf keeps every edge between neighbouring tiles' candidates."""
    scores_t = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    pos = torch.as_tensor(np.asarray(positions_m, dtype=np.float64))
    T, k = scores_t.shape
    pairs = torch.as_tensor(neighbour_tile_pairs(grid_rc, heading_deg)).reshape(-1, 2)
    g = torch.as_tensor(np.asarray(grid_rc, dtype=np.float64))
    n_nb = torch.bincount(pairs[:, 1], minlength=T).float() if len(pairs) else torch.zeros(T)
    # node features
    rank = torch.arange(k).repeat(T)
    best = scores_t[:, :1]
    x = torch.stack(
        [
            scores_t.reshape(-1),
            (rank.float() / max(k, 1)),
            (scores_t - best).reshape(-1),
            (scores_t - best.mean()).reshape(-1),
            n_nb.repeat_interleave(k) / 8.0,
        ],
        dim=1,
    )
    # edges: every candidate of tile a to every candidate of tile b, for neighbouring a, b
    if len(pairs):
        a, b = pairs[:, 0], pairs[:, 1]
        implied = torch.stack([(g[b, 1] - g[a, 1]) * stride_m, -(g[b, 0] - g[a, 0]) * stride_m], dim=1)  # (P, 2)
        obs = pos[b][:, None, :, :] - pos[a][:, :, None, :]  # (P, k_a, k_b, 2)
        disc = (obs - implied[:, None, None, :]) / stride_m
        norm = disc.norm(dim=-1)
        keep = norm <= max_disc
        p_i, i_i, j_i = torch.nonzero(keep, as_tuple=True)
        src = a[p_i] * k + i_i
        dst = b[p_i] * k + j_i
        edge_index = torch.stack([src, dst]).long()
        d = disc[p_i, i_i, j_i]
        edge_attr = torch.cat([d, norm[p_i, i_i, j_i][:, None]], dim=1).float()
    else:
        edge_index = torch.zeros(2, 0, dtype=torch.long)
        edge_attr = torch.zeros(0, EDGE_DIM)
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32)).reshape(-1) if labels is not None else None
    return SceneGraph(x, edge_index, edge_attr, torch.arange(T).repeat_interleave(k), rank, (int(T), int(k)), y)


def batch_graphs(graphs: list[SceneGraph]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Concatenate graphs (node offsets added): x, edge_index, edge_attr, y."""
    xs, eis, eas, ys = [], [], [], []
    off = 0
    for gr in graphs:
        xs.append(gr.x)
        eis.append(gr.edge_index + off)
        eas.append(gr.edge_attr)
        if gr.y is not None:
            ys.append(gr.y)
        off += gr.x.shape[0]
    y = torch.cat(ys) if len(ys) == len(graphs) else None
    return torch.cat(xs), torch.cat(eis, dim=1), torch.cat(eas), y


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


class AgreementConv(MessagePassing):
    """h_i += MLP(h_i, sum_j MLP(h_i, h_j, e_ij)): messages from neighbouring tiles'
    candidates, weighted by how well their map offset matches the grid's."""

    def __init__(self, hidden: int) -> None:
        super().__init__(aggr="add")
        self.msg = _mlp(2 * hidden + EDGE_DIM, hidden, hidden)
        self.upd = _mlp(2 * hidden, hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        m = self.propagate(edge_index, h=h, edge_attr=edge_attr)
        return h + self.upd(torch.cat([self.norm(h), m / 8.0], dim=1))

    def message(self, h_i: torch.Tensor, h_j: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.msg(torch.cat([h_i, h_j, edge_attr], dim=1))


class SceneGraphNet(nn.Module):
    """Node logits of a scene graph (module doc)."""

    def __init__(self, hidden: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.hidden, self.n_layers = int(hidden), int(layers)
        self.inp = _mlp(NODE_DIM, hidden, hidden)
        self.convs = nn.ModuleList(AgreementConv(hidden) for _ in range(layers))
        self.out = _mlp(hidden + NODE_DIM, hidden, 1)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for conv in self.convs:
            h = conv(h, edge_index, edge_attr)
        return self.out(torch.cat([h, x], dim=1)).squeeze(1)

    @torch.no_grad()
    def score_graph(self, g: SceneGraph) -> np.ndarray:
        """(T, k) logits of one graph."""
        self.eval()
        return self(g.x, g.edge_index, g.edge_attr).reshape(g.shape).cpu().numpy()


def rescore_candidates(
    model: SceneGraphNet,
    grid_rc: np.ndarray,
    heading_deg: np.ndarray,
    rows: np.ndarray,
    scores: np.ndarray,
    positions_m: np.ndarray,
    stride_m: float,
    max_disc: float = 1.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each tile's candidates reordered by the GNN logit (best first): rows, logits and the
    permutation (T, k) applied."""
    g = build_scene_graph(grid_rc, heading_deg, scores, positions_m, stride_m, max_disc)
    logit = model.score_graph(g)
    order = np.argsort(-logit, axis=1, kind="stable")
    return np.take_along_axis(rows, order, 1), np.take_along_axis(logit, order, 1).astype(np.float32), order


# --------------------------------------------------------------------------- checkpoints


def save_scene_graph(path: str | os.PathLike[str], model: SceneGraphNet, embedder: dict[str, str], extra: dict[str, Any] | None = None) -> Path:
    """Write a weights-only-loadable checkpoint (plain data) with ``inputs.embedder``."""
    from cmpc.models.checkpoint import save_checkpoint

    payload = {
        "format": FORMAT,
        "version": 1,
        "hidden": model.hidden,
        "layers": model.n_layers,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "inputs": {"embedder": dict(embedder)},
        **(extra or {}),
    }
    return save_checkpoint(path, payload)


def load_scene_graph(path: str | os.PathLike[str], embedder: dict[str, str] | str | os.PathLike[str] | None = None) -> tuple[SceneGraphNet, dict[str, Any]]:
    """Load with ``weights_only=True``; when ``embedder`` (a provenance record or a path) is
    given, refuse a checkpoint trained with another embedder (one line)."""
    from cmpc.models.checkpoint import load_checkpoint

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"scene-graph model not found: {p}; train it with `cmpc train scene EXPERIMENT.json`")
    ck = load_checkpoint(p)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a scene-graph checkpoint (format {FORMAT!r}); retrain with `cmpc train scene`")
    if embedder is not None:
        from cmpc.utils import provenance

        provenance.check(provenance.recorded(ck, "embedder"), embedder, artefact=f"scene-graph model {p}", role="embedder",
                         fix="retrain it with `cmpc train scene EXPERIMENT.json`")
    model = SceneGraphNet(int(ck["hidden"]), int(ck["layers"]))
    model.load_state_dict(ck["state_dict"])
    model.eval()
    return model, ck
