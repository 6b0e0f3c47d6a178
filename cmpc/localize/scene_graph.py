"""The scene-graph GNN as a :class:`cmpc.localize.scene.CandidateRescorer` (method ``gnn+verify``).

Every tile's coarse candidates are reordered by the GNN's logit
(:mod:`cmpc.models.scene_graph`): a candidate whose neighbouring tiles' candidates sit at
the map offset the query grid implies moves up. RANSAC's rank stages (rank < 1, < 3, < 10,
all) then sample in the GNN's order, and the "most confident tiles alone" placements are the
tiles with the highest top logit.
"""

from __future__ import annotations

import os

import numpy as np

from cmpc.localize.scene import SceneTiles
from cmpc.models.scene_graph import SceneGraphNet, load_scene_graph, rescore_candidates


class SceneGraphRescorer:
    """Reorders a scene's candidates by :class:`SceneGraphNet` logits (module doc)."""

    def __init__(self, model: SceneGraphNet, max_disc: float = 1.5) -> None:
        self.model = model
        self.max_disc = float(max_disc)

    def rescore(self, tiles: SceneTiles, rows: np.ndarray, scores: np.ndarray, positions_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        new_rows, logits, _ = rescore_candidates(self.model, tiles.grid_rc, tiles.heading_deg, rows, scores, positions_m, tiles.stride_m, self.max_disc)
        return new_rows, logits

    @classmethod
    def load(cls, path: str | os.PathLike[str], embedder: str | os.PathLike[str] | dict | None) -> SceneGraphRescorer:
        """From a checkpoint; refused when it was trained with another embedder than ``embedder``."""
        model, ck = load_scene_graph(path, embedder)
        return cls(model, float(ck.get("max_disc", 1.5)))
