"""The per-batch localization step: embed SAR queries, search the map, optionally refine.

:class:`Localizer` holds the embedder, the :class:`~cmpc.index.store.ReferenceIndex`, an
optional prior (allowed rows) and an optional refiner. ``localize_batch(x)`` turns a batch of
query tensors (B, C, S, S) into a :class:`LocalizeResult`: coarse top-k (rows, ids, cosine
scores), the coarse position (centre of the top-1 reference) and, with a refiner, its
reordering of the candidates and a metre-level position.

The refiner is any object with::

    refine(query_emb (B, D) float32 ndarray, topk_rows (B, k) int64 ndarray,
           topk_scores (B, k) float32 ndarray, index: ReferenceIndex,
           query_images (B, C, S, S) torch tensor | None)
        -> (refined_order (B, k) rows, refined_positions (B, 2) metres)

and is loaded in exactly one place, :func:`load_refiner` (which defers to the refiner's own
loader in :mod:`cmpc.localize.refine`). :meth:`Localizer.from_experiment` hands it the
embedder checkpoint in use: a refiner trained on another embedder (another SHA-256 of the
checkpoint file) is refused with one line naming both hashes, as an index built by another
embedder is. :meth:`Localizer.inputs` is the provenance record reports carry
(:mod:`cmpc.utils.provenance`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cmpc.config import Experiment
from cmpc.errors import CheckpointError, DataError
from cmpc.index.build import default_checkpoint, hashed_index_name
from cmpc.index.store import ReferenceIndex
from cmpc.localize.prior import prior_rows
from cmpc.models.checkpoint import load_embedder
from cmpc.models.embedder import Embedder
from cmpc.utils import provenance
from cmpc.utils.runtime import resolve_device

REFINER_FILE = "refiner.pt"


class Refiner(Protocol):
    """What :class:`Localizer` needs from a refiner (see the module doc)."""

    def refine(
        self,
        query_emb: np.ndarray,
        topk_rows: np.ndarray,
        topk_scores: np.ndarray,
        index: ReferenceIndex,
        query_images: torch.Tensor | None,
    ) -> tuple[Any, Any]: ...


def load_refiner(exp: Experiment, embedder: dict[str, Any] | str | os.PathLike[str] | None = None) -> Refiner | None:
    """The experiment's refiner, or None when ``refine.enabled`` is false or
    ``runs/<name>/refiner.pt`` is absent. The loading itself is the refiner module's.

    ``embedder``: the embedder checkpoint in use (path or ``{"path", "sha256"}``; default
    ``runs/<name>/emb_best.pt``): a refiner trained on another one is a one-line
    :class:`CheckpointError` naming both hashes."""
    path = exp.run_dir / REFINER_FILE
    if not exp.refine.enabled or not path.is_file():
        return None
    try:
        from cmpc.localize.refine import load_refiner as _load
    except ModuleNotFoundError as e:
        if e.name != "cmpc.localize.refine":
            raise
        raise CheckpointError(f"{path} exists but this cmpc has no refiner (cmpc.localize.refine); set refine.enabled=false") from None
    return _load(exp, embedder)


@dataclass
class LocalizeResult:
    """Localization of B queries with k candidates each.

    ``query_emb`` (B, D) float32; ``rows`` (B, k) int64 index rows, best first; ``ids``
    (B, k) int64 location ids; ``scores`` (B, k) float32 cosine similarities; ``coarse_xy``
    (B, 2) float64 metres = centre of the top-1 reference; ``refined_rows`` (B, k) the
    refiner's order (None without refiner); ``refined_xy`` (B, 2) metres (= coarse without
    refiner).
    """

    query_emb: np.ndarray
    rows: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    coarse_xy: np.ndarray
    refined_rows: np.ndarray | None
    refined_xy: np.ndarray

    @property
    def refined(self) -> bool:
        """Whether a refiner produced ``refined_rows``/``refined_xy``."""
        return self.refined_rows is not None

    def __len__(self) -> int:
        return len(self.rows)


def serving_index_dir(exp: Experiment, ckpt_hash: str) -> Path:
    """The index folder for checkpoint ``ckpt_hash``: ``index/<name>/`` when it was built with
    that checkpoint (or no other candidate exists: loading then names both hashes), else the
    per-checkpoint ``index/<name>@<hash[:12]>/`` that ``cmpc test --checkpoint`` builds."""
    from cmpc.index.store import MANIFEST_FILE, read_manifest
    from cmpc.errors import CmpcError

    own = exp.index_dir
    hashed = own.with_name(hashed_index_name(own.name, ckpt_hash))
    if not (hashed / MANIFEST_FILE).is_file():
        return own
    try:
        if read_manifest(own).get("checkpoint", {}).get("hash") == ckpt_hash:
            return own
    except CmpcError:
        pass
    return hashed


class Localizer:
    """Embedder + reference index (+ prior, + refiner) applied batch by batch."""

    def __init__(
        self,
        model: Embedder,
        index: ReferenceIndex,
        top_k: int = 20,
        allowed_rows: np.ndarray | None = None,
        refiner: Refiner | None = None,
        device: str | torch.device = "cpu",
        amp: bool = True,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_sha256: str | None = None,
    ) -> None:
        self.model = model
        self.index = index
        self.top_k = int(top_k)
        self.allowed_rows = allowed_rows
        self.allowed_mask: np.ndarray | None = None
        if allowed_rows is not None:
            self.allowed_mask = np.zeros(index.ntotal, dtype=bool)
            self.allowed_mask[allowed_rows] = True
        self.refiner = refiner
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self._checkpoint_sha256 = checkpoint_sha256

    @classmethod
    def from_experiment(
        cls,
        exp: Experiment,
        checkpoint: str | os.PathLike[str] | None = None,
        index_dir: str | os.PathLike[str] | None = None,
        use_refiner: bool = True,
    ) -> Localizer:
        """Load the checkpoint (default ``runs/<name>/emb_best.pt``), the index (default
        ``index/<name>/``, checked against the checkpoint), the prior and the refiner."""
        ckpt = default_checkpoint(exp, checkpoint)
        device = resolve_device(exp.train.device)
        model, meta = load_embedder(ckpt, device)
        index = ReferenceIndex.load(
            index_dir or serving_index_dir(exp, meta["hash"]),
            expect_hash=meta["hash"],
            expect_dim=model.embed_dim,
            checkpoint_path=ckpt,
            nprobe=exp.index.nprobe,
            ef_search=exp.index.ef_search,
            use_gpu=exp.index.use_gpu and device.type == "cuda",
            mmap=exp.index.mmap,
            torch_device=str(device) if device.type == "cuda" else None,
        )
        allowed = prior_rows(exp.localize, index)
        embedder = provenance.record(ckpt, meta["hash"])
        refiner = load_refiner(exp, embedder) if use_refiner else None
        return cls(model, index, exp.localize.top_k, allowed, refiner, device, exp.train.amp, ckpt, meta["hash"])

    def inputs(self) -> dict[str, Any]:
        """The provenance record of a report made with this localizer: ``embedder`` (the
        checkpoint), ``index`` (its ``manifest.json``) and ``refiner`` (when one is used and
        was loaded from a file); each ``{"path", "sha256"}`` (see :mod:`cmpc.utils.provenance`)."""
        from cmpc.index.store import MANIFEST_FILE

        out: dict[str, Any] = {}
        if self.checkpoint_path is not None:
            out["embedder"] = provenance.record(self.checkpoint_path, self._checkpoint_sha256)
        directory = getattr(self.index, "directory", None)
        if directory is not None and (Path(directory) / MANIFEST_FILE).is_file():
            out["index"] = provenance.record(Path(directory) / MANIFEST_FILE)
        source = getattr(self.refiner, "source", None)
        if source:
            out["refiner"] = dict(source)
        return out

    # ------------------------------------------------------------------ properties

    @property
    def sar_channels(self) -> int:
        """SAR bands the embedder takes."""
        return int(self.model.sar_channels)

    @property
    def img_size(self) -> int:
        """Model input side, pixels (as the references were embedded)."""
        return int(self.index.manifest.get("img_size") or 0)

    def check_channels(self, n_bands: int, what: str) -> None:
        """One-line DataError when queries have another band count than the model's SAR input."""
        if int(n_bands) != self.sar_channels:
            model = f"the model {self.checkpoint_path}" if self.checkpoint_path else "the model"
            raise DataError(
                f"{what} have {n_bands} band(s) but {model} takes {self.sar_channels} SAR band(s); "
                f"give {self.sar_channels}-band SAR (e.g. localize.raster_bands for a GeoTIFF) or use a model trained on {n_bands}-band SAR"
            )

    # ------------------------------------------------------------------ work

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> np.ndarray:
        """(B, C, S, S) standardised SAR patches -> (B, D) float32 L2-normalised embeddings."""
        self.model.eval()
        x = x.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, enabled=self.amp, dtype=torch.float16):
            e = self.model(x, "sar")
        return e.float().cpu().numpy()

    def localize_batch(self, x: torch.Tensor) -> LocalizeResult:
        """Localize B query patches ``x`` (B, C, S, S); see :class:`LocalizeResult`."""
        self.check_channels(x.shape[1], "the queries")
        emb = self.embed(x)
        scores, rows = self.index.search(emb, self.top_k, self.allowed_rows)
        ids = self.index.ids[rows]
        coarse = self.index.positions[rows[:, 0]] if rows.shape[1] else np.full((len(rows), 2), np.nan)
        refined_rows = None
        refined = coarse.copy()
        if self.refiner is not None and rows.shape[1]:
            order, pos = self.refiner.refine(emb, rows, scores, self.index, x)
            refined_rows = np.asarray(order.cpu() if torch.is_tensor(order) else order, dtype=np.int64)
            refined = np.asarray(pos.cpu() if torch.is_tensor(pos) else pos, dtype=np.float64).reshape(-1, 2)
        return LocalizeResult(emb, rows, ids, scores, coarse, refined_rows, refined)

    def ground_truth_ranks(self, result: LocalizeResult, true_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(coarse ranks (B,), refined ranks (B,) or None), 1-based, inf = not found.

        A query whose correct reference (same id) is in the returned top-k gets its position
        there; otherwise its exact rank among all (allowed) references, streamed in chunks
        (at least k+1, since the search did not return it). The refiner only reorders the
        top-k, so a correct reference outside it keeps that coarse rank.
        """
        from cmpc.evaluate.metrics import count_higher, first_correct_position

        k = result.rows.shape[1]
        pos = first_correct_position(result.ids, true_ids)
        outside = np.full(len(pos), np.inf)
        # Only queries whose correct reference is not in the top-k need the streamed count:
        # with a good model that is few of them, which keeps evaluation cheap on big maps.
        todo = np.flatnonzero(~np.isfinite(pos) & (true_ids >= 0))
        if len(todo):
            emb, ids = result.query_emb[todo], true_ids[todo]
            correct = self.index.correct_scores(emb, ids, self.allowed_mask)
            higher = count_higher(emb, ids, correct, self.index.iter_features(), self.index.ids, self.allowed_mask)
            exact = np.where(np.isfinite(correct), 1.0 + higher, np.inf)
            outside[todo] = np.maximum(exact, k + 1.0)
        coarse = np.where(np.isfinite(pos), pos, outside)
        if result.refined_rows is None:
            return coarse, None
        pos_r = first_correct_position(self.index.ids[result.refined_rows], true_ids)
        return coarse, np.where(np.isfinite(pos_r), pos_r, outside)
