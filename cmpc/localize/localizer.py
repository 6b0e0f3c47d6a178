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
loader in :mod:`cmpc.localize.refine`). :meth:`Localizer.load` hands it the embedder
checkpoint in use: a refiner trained on another embedder (another SHA-256 of the checkpoint
file) is refused with one line naming both hashes, as an index built by another embedder is.
:meth:`Localizer.inputs` is the provenance record reports carry (:mod:`cmpc.utils.provenance`).

:meth:`Localizer.load` takes what it reads (the checkpoint, the index folder, the refiner
file) and the config sections it uses (``localize``, ``index``, ``refine``);
:meth:`Localizer.from_experiment` is the thin composition the commands use: the experiment's
checkpoint, index folder (:func:`cmpc.index.build.serving_index_dir`) and refiner.
Scoring against ground truth is the evaluation's (:func:`cmpc.evaluate.ranks.ground_truth_ranks`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cmpc.config import Experiment, IndexConfig, LocalizeConfig, RefineConfig
from cmpc.errors import CheckpointError, DataError
from cmpc.index.build import serving_index_dir
from cmpc.index.store import MANIFEST_FILE, ReferenceIndex
from cmpc.localize.prior import prior_rows
from cmpc.models.checkpoint import checkpoint_hash, default_checkpoint, load_embedder
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


#: a refiner path that names no file: a model card without a refiner (CFOG fine alignment,
#: ``refine.aligner = "cfog"``, still applies; nothing is looked up in ``runs/``)
NO_REFINER_FILE = Path(os.devnull)


def load_refiner(
    path: str | os.PathLike[str] | None,
    cfg: RefineConfig | None,
    embedder: dict[str, Any] | str | os.PathLike[str],
    device: str | torch.device = "cpu",
) -> Refiner | None:
    """The refiner stored at ``path`` (``runs/<name>/refiner.pt``) with the query-time
    switches of ``cfg``, or None when there is no ``cfg``, ``refine.enabled`` is false or
    ``path`` is absent (with ``refine.aligner = "cfog"`` an absent file gives a refiner of
    CFOG fine alignment alone: nothing to train). The loading itself is the refiner module's.

    ``embedder``: the embedder checkpoint in use (path or ``{"path", "sha256"}``): a refiner
    trained on another one is a one-line :class:`CheckpointError` naming both hashes."""
    if cfg is None or not cfg.enabled:
        return None
    have = path is not None and Path(path).is_file()
    if not have and cfg.aligner != "cfog":
        return None
    try:
        from cmpc.localize.refine import cfog_refiner, refiner_from_checkpoint
    except ModuleNotFoundError as e:
        if e.name != "cmpc.localize.refine":
            raise
        raise CheckpointError(f"{path} exists but this cmpc has no refiner (cmpc.localize.refine); set refine.enabled=false") from None
    if not have:  # refine.aligner=cfog needs no trained file: fine alignment alone
        return cfog_refiner(cfg, device)
    return refiner_from_checkpoint(path, cfg, device, embedder=embedder)


@dataclass
class LocalizeResult:
    """Localization of B queries with k candidates each.

    ``query_emb`` (B, D) float32; ``rows`` (B, k) int64 index rows, best first; ``ids``
    (B, k) int64 location ids; ``scores`` (B, k) float32 cosine similarities; ``coarse_xy``
    (B, 2) float64 metres = centre of the top-1 reference; ``refined_rows`` (B, k) the
    refiner's order (None without refiner); ``refined_xy`` (B, 2) metres (= coarse without
    refiner); ``align_peak`` (B,) the refiner's best fine-alignment peak (mean cosine; None
    without fine alignment) and ``position_from`` (B,) str: ``"aligned"``, ``"gnn"`` or
    ``"coarse"`` (the refiner's evidence was below its calibrated threshold: coarse kept).
    """

    query_emb: np.ndarray
    rows: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    coarse_xy: np.ndarray
    refined_rows: np.ndarray | None
    refined_xy: np.ndarray
    align_peak: np.ndarray | None = None
    position_from: np.ndarray | None = None

    @property
    def refined(self) -> bool:
        """Whether a refiner produced ``refined_rows``/``refined_xy``."""
        return self.refined_rows is not None

    def __len__(self) -> int:
        return len(self.rows)


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

    @property
    def checkpoint_sha256(self) -> str | None:
        """SHA-256 of the embedder checkpoint (None for a model built in memory)."""
        return self._checkpoint_sha256

    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike[str],
        index_dir: str | os.PathLike[str],
        localize_cfg: LocalizeConfig,
        index_cfg: IndexConfig,
        refine_cfg: RefineConfig | None = None,
        refiner_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        amp: bool = True,
    ) -> Localizer:
        """Load the embedder ``checkpoint``, the index at ``index_dir`` (checked against the
        checkpoint; search settings from ``index_cfg``), the prior and ``top_k`` of
        ``localize_cfg``, and the refiner at ``refiner_path`` (with ``refine_cfg``; none when
        either is None, the file is absent or ``refine.enabled`` is false)."""
        device = torch.device(device)
        model, meta = load_embedder(checkpoint, device)
        index = ReferenceIndex.load(
            index_dir,
            expect_hash=meta["hash"],
            expect_dim=model.embed_dim,
            checkpoint_path=checkpoint,
            nprobe=index_cfg.nprobe,
            ef_search=index_cfg.ef_search,
            use_gpu=index_cfg.use_gpu and device.type == "cuda",
            mmap=index_cfg.mmap,
            torch_device=str(device) if device.type == "cuda" else None,
        )
        allowed = prior_rows(localize_cfg, index)
        refiner = load_refiner(refiner_path, refine_cfg, provenance.record(checkpoint, meta["hash"]), device)
        return cls(model, index, localize_cfg.top_k, allowed, refiner, device, amp, checkpoint, meta["hash"])

    @classmethod
    def from_experiment(
        cls,
        exp: Experiment,
        checkpoint: str | os.PathLike[str] | None = None,
        index_dir: str | os.PathLike[str] | None = None,
        use_refiner: bool = True,
        refiner_path: str | os.PathLike[str] | None = None,
    ) -> Localizer:
        """:meth:`load` with the experiment's files: the checkpoint (default
        ``runs/<name>/emb_best.pt``), the index (default the one serving that checkpoint,
        :func:`cmpc.index.build.serving_index_dir`), the refiner ``refiner_path`` (default
        ``runs/<name>/refiner.pt``; none when ``use_refiner`` is false) and its sections."""
        ckpt = default_checkpoint(exp.run_dir, checkpoint)
        if index_dir is None:
            index_dir = serving_index_dir(exp.index_dir, checkpoint_hash(ckpt))
        return cls.load(
            ckpt,
            index_dir,
            exp.localize,
            exp.index,
            exp.refine if use_refiner else None,
            refiner_path if refiner_path is not None else exp.run_dir / REFINER_FILE,
            device=resolve_device(exp.train.device),
            amp=exp.train.amp,
        )

    def inputs(self) -> dict[str, Any]:
        """The provenance record of a report made with this localizer: ``embedder`` (the
        checkpoint), ``index`` (its ``manifest.json``) and ``refiner`` (when one is used and
        was loaded from a file); each ``{"path", "sha256"}`` (see :mod:`cmpc.utils.provenance`)."""
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
        peak = source = None
        if self.refiner is not None and rows.shape[1]:
            order, pos = self.refiner.refine(emb, rows, scores, self.index, x)
            refined_rows = np.asarray(order.cpu() if torch.is_tensor(order) else order, dtype=np.int64)
            refined = np.asarray(pos.cpu() if torch.is_tensor(pos) else pos, dtype=np.float64).reshape(-1, 2)
            peak, source = getattr(self.refiner, "last_peaks", None), getattr(self.refiner, "last_source", None)
        return LocalizeResult(emb, rows, ids, scores, coarse, refined_rows, refined, peak, source)
