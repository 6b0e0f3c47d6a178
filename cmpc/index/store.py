"""Reading a built reference index: manifest checks, top-k search, reference metadata.

``index/<name>/`` holds (see :mod:`cmpc.index.build`)::

    index.faiss      FAISS index over the optical reference embeddings (row r = reference r)
    features.h5      features (N, D) float32, ids (N,) int64, positions (N, 2) float64 metres,
                     bounds (N, 4) float64 metres, names (N,), file_paths (N,), source (N,) int32
    footprints.gpkg  one polygon per reference (the map, for plots and GIS)
    manifest.json    checkpoint hash, embed dim, CRS, factory, counts, sources, versions

A sharded index (``index.shards`` > 1, see :mod:`cmpc.index.shards`) has
``shards/shard_NNN.faiss`` instead of ``index.faiss``; it is searched through the same
:meth:`ReferenceIndex.search`. Search backends (chosen by :meth:`ReferenceIndex.load`):
faiss on the CPU; faiss on the GPU when this faiss build has GPU support; for an exact
(Flat) index on a CUDA machine without faiss-gpu, torch ``matmul + topk`` on the GPU
(:mod:`cmpc.index.torch_search`). An index built with ``index.engine = "milvus"`` has no
FAISS file: its vectors are a Milvus collection (``manifest["milvus"]``), searched through the
same :meth:`ReferenceIndex.search` (:mod:`cmpc.index.milvus`; ``backend`` reads
``milvus-lite`` or ``milvus``).

:meth:`ReferenceIndex.load` refuses an index that does not fit the model or the queries
(another checkpoint, another embedding size, another CRS) with one line saying how to fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import h5py
import numpy as np

from cmpc.config import MAX_INDEX_NAME, validate_index_name  # noqa: F401 - index names are checked where the config is read
from cmpc.data.crs import crs_equal, normalize_crs
from cmpc.errors import DataError, IndexMismatchError
from cmpc.index.factory import filtered_search_params, flat_vectors, gpu_available, maybe_to_gpu, set_search_defaults
from cmpc.index.shards import ShardedIndex, read_faiss

INDEX_FILE = "index.faiss"
FEATURES_FILE = "features.h5"
FOOTPRINTS_FILE = "footprints.gpkg"
MANIFEST_FILE = "manifest.json"
INDEX_FILES = (INDEX_FILE, FEATURES_FILE, FOOTPRINTS_FILE, MANIFEST_FILE)
#: ``manifest["format"]`` of the indexes this version writes (and recognises as its own).
INDEX_FORMAT = 1
#: Search backends :meth:`ReferenceIndex.load` accepts (``auto`` picks; see the module doc).
BACKENDS = ("auto", "faiss", "torch")
#: Vector engines an index may use (``manifest["engine"]``, ``index.engine``; see :mod:`cmpc.index.milvus`).
ENGINES = ("faiss", "milvus")
#: On the CPU, exact (Flat) searches of at least this many queries go through torch
#: matmul + topk: one GEMM, 5x faster per query than faiss's batched Flat search at 100k
#: references (faiss 1.15 only switches to BLAS from 128000 queries; docs/BENCHMARKS.md,
#: "Exact search"). Single queries stay with faiss (slightly faster).
TORCH_BATCH_MIN = 16

#: Feature matrices up to this size are read into RAM once; larger ones stream from HDF5.
_IN_MEMORY_BYTES = 512 * 2**20
_CHUNK_ROWS = 65_536


def check_replaceable(d: str | os.PathLike[str]) -> None:
    """Refuse (one line) to build over ``d`` unless it is absent, an empty folder, or a cmpc index.

    A build replaces ``index/<name>/`` as a whole; a folder without a readable
    ``manifest.json`` of the index format (:data:`INDEX_FORMAT`) is someone else's and is
    never replaced.
    """
    p = Path(d)
    if p.is_symlink():
        raise DataError(f"refusing to replace {p}: it is a symbolic link; remove the link or choose another index.name")
    if not p.exists():
        return
    if p.is_dir():
        if not any(p.iterdir()):
            return
        try:
            m = read_manifest(p)
        except DataError:
            m = None
        if m is not None and m.get("format") == INDEX_FORMAT:
            return
    raise DataError(
        f"refusing to replace {p}: it exists and is not a cmpc index (no readable {MANIFEST_FILE}); "
        "move it away or choose another index.name"
    )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an index folder (or of a ``manifest.json`` path).

    Raises :class:`DataError` (one line) when it is missing or not valid JSON.
    """
    p = Path(path)
    mpath = p / MANIFEST_FILE if p.suffix != ".json" else p
    if not mpath.is_file():
        where = p if p.suffix != ".json" else p.parent
        raise DataError(f"no index at {where} ({MANIFEST_FILE} is missing); build it with `cmpc index build EXPERIMENT.json`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{mpath} is corrupt (not JSON); rebuild the index with `cmpc index build EXPERIMENT.json`") from None
    if not isinstance(manifest, dict) or "embed_dim" not in manifest or "checkpoint" not in manifest:
        raise DataError(f"{mpath} is not a cmpc index manifest; rebuild the index with `cmpc index build EXPERIMENT.json`")
    return manifest


def short_hash(h: str | None) -> str:
    """First 12 hex digits of a SHA-256, for messages."""
    return (h or "?")[:12]


class ReferenceIndex:
    """A loaded reference index: FAISS search plus per-row ids, positions and features.

    Rows are 0..N-1 in insertion order. ``ids`` (N,) int64 location ids, ``positions`` (N, 2)
    float64 reference centres in metres (map CRS), ``bounds`` (N, 4) footprints in metres,
    ``features`` (N, D) float32 (read lazily from ``features.h5``).
    """

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        index: faiss.Index,
        ids: np.ndarray,
        positions: np.ndarray,
        bounds: np.ndarray,
        nprobe: int,
        ef_search: int,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.index = index
        self.ids = ids
        self.positions = positions
        self.bounds = bounds
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.on_gpu = False
        #: "faiss", "faiss-gpu" or "torch-<device>" (exact matmul + topk)
        self.backend = "faiss"
        self.sharded: ShardedIndex | None = None
        #: the Milvus side of an ``index.engine = "milvus"`` index (:mod:`cmpc.index.milvus`), else None
        self.milvus: Any = None
        self._torch: Any = None
        self._torch_batch: Any = None
        self._features: np.ndarray | None = None
        self._strings: dict[str, list[str]] = {}
        self._source: np.ndarray | None = None
        self._id_order = np.argsort(ids, kind="stable")
        self._ids_sorted = ids[self._id_order]

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        expect_hash: str | None = None,
        expect_dim: int | None = None,
        expect_crs: str | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool = False,
        mmap: bool = False,
        backend: str = "auto",
        torch_device: str | None = None,
    ) -> ReferenceIndex:
        """Open ``directory`` and check it against the model and the queries.

        ``expect_hash``: SHA-256 of the embedder checkpoint the queries are embedded with;
        ``expect_dim``: its embedding size; ``expect_crs``: the queries' CRS. Any mismatch is
        an :class:`IndexMismatchError`; missing or corrupt files are a :class:`DataError`.
        ``mmap``: memory-map the FAISS file(s) read-only instead of reading them into RAM.
        ``backend``: ``auto`` (faiss; with ``use_gpu``: faiss-gpu, else torch on CUDA for a
        Flat index), ``faiss`` or ``torch`` (exact matmul + topk on ``torch_device``, default
        CUDA when present else CPU; Flat indexes only).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        d = Path(directory)
        manifest = read_manifest(d)
        engine = manifest.get("engine", "faiss")
        if engine not in ENGINES:
            raise DataError(f"{d / MANIFEST_FILE} names index engine {engine!r}; this cmpc knows {', '.join(ENGINES)}")
        shard_entries = manifest.get("shards") or []
        skip = {INDEX_FILE} if (shard_entries or engine == "milvus") else set()
        needed = [n for n in INDEX_FILES if n not in skip] + [e["file"] for e in shard_entries]
        for name in needed:
            if not (d / name).is_file():
                raise DataError(f"index {d} is incomplete: {name} is missing; rebuild it with `cmpc index build EXPERIMENT.json`")
        built_hash = manifest.get("checkpoint", {}).get("hash")
        if expect_hash is not None and built_hash != expect_hash:
            ck = f"{checkpoint_path} is" if checkpoint_path else "the checkpoint in use is"
            fix = f" --checkpoint {checkpoint_path}" if checkpoint_path else ""
            raise IndexMismatchError(
                f"{d} was built with checkpoint {short_hash(built_hash)} ({manifest['checkpoint'].get('path')}) "
                f"but {ck} {short_hash(expect_hash)}; rebuild it with `cmpc index build EXPERIMENT.json{fix}`"
            )
        dim = int(manifest["embed_dim"])
        if expect_dim is not None and dim != int(expect_dim):
            raise IndexMismatchError(
                f"{d} holds {dim}-dimensional embeddings but the model makes {expect_dim}-dimensional ones; "
                "rebuild it with `cmpc index build EXPERIMENT.json`"
            )
        sharded = None
        milvus = None
        if engine == "milvus":
            from cmpc.index.milvus import MilvusSearch

            milvus = MilvusSearch(
                d, manifest, nprobe=int(nprobe if nprobe is not None else manifest.get("nprobe", 16)),
                ef_search=int(ef_search if ef_search is not None else manifest.get("ef_search", 64)),
            )
            index = milvus
        elif shard_entries:
            try:
                sharded = ShardedIndex.open(d, shard_entries, int(manifest["embed_dim"]), mmap=mmap)
            except (RuntimeError, ValueError) as e:
                first = " ".join(str(e).split())[-160:]
                raise DataError(f"the shards of index {d} are corrupt or inconsistent ({first}); rebuild it with `cmpc index build EXPERIMENT.json`") from None
            index = sharded.index
        else:
            index = cls._read_faiss(d / INDEX_FILE, mmap)
        try:
            with h5py.File(d / FEATURES_FILE, "r") as h5:
                ids = np.asarray(h5["ids"][:], dtype=np.int64)
                positions = np.asarray(h5["positions"][:], dtype=np.float64).reshape(-1, 2)
                bounds = np.asarray(h5["bounds"][:], dtype=np.float64).reshape(-1, 4)
                n_feat = int(h5["features"].shape[0])
                d_feat = int(h5["features"].shape[1])
        except (OSError, KeyError) as e:
            if milvus is not None:
                milvus.close()
            raise DataError(f"{d / FEATURES_FILE} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); rebuild the index") from None
        n = int(manifest.get("count", -1))
        if not (index.ntotal == len(ids) == len(positions) == n_feat == n) or index.d != dim or d_feat != dim:
            if milvus is not None:
                milvus.close()
            raise DataError(
                f"index {d} is inconsistent (faiss rows {index.ntotal}, features {n_feat}x{d_feat}, ids {len(ids)}, "
                f"manifest count {n} dim {dim}); rebuild it with `cmpc index build EXPERIMENT.json`"
            )
        ref = cls(
            d,
            manifest,
            index,
            ids,
            positions,
            bounds,
            nprobe=int(nprobe if nprobe is not None else manifest.get("nprobe", 16)),
            ef_search=int(ef_search if ef_search is not None else manifest.get("ef_search", 64)),
        )
        ref.milvus = milvus
        if milvus is not None:
            ref.backend = "milvus-lite" if milvus.lite else "milvus"
            if expect_crs is not None:
                try:
                    ref.check_crs(expect_crs, "the queries")
                except IndexMismatchError:
                    milvus.close()
                    raise
            return ref
        if expect_crs is not None:
            ref.check_crs(expect_crs, "the queries")
        ref.sharded = sharded
        for sub in [s for _, s in sharded.shards] if sharded is not None else [ref.index]:
            set_search_defaults(sub, ref.nprobe, ref.ef_search)
        ref._choose_backend(backend, use_gpu, torch_device)
        return ref

    @property
    def engine(self) -> str:
        """``faiss`` or ``milvus`` (``manifest["engine"]``; older indexes are faiss)."""
        return str(self.manifest.get("engine", "faiss"))

    def close(self) -> None:
        """Release what the index holds outside this object (a Milvus connection; nothing for faiss)."""
        if self.milvus is not None:
            self.milvus.close()

    @property
    def exact(self) -> bool:
        """Whether the index is exact (a Flat factory): search = brute-force inner product."""
        return str(self.manifest.get("factory", "")).replace(" ", "") in ("Flat", "IDMap,Flat")

    def _choose_backend(self, backend: str, use_gpu: bool, torch_device: str | None) -> None:
        """Pick faiss / faiss-gpu / torch (see :meth:`load`)."""
        import torch

        if backend == "torch" or (backend == "auto" and use_gpu and self.exact and not gpu_available() and torch.cuda.is_available()):
            if not self.exact:
                raise IndexMismatchError(
                    f"the torch search backend is exact (matmul + topk) and needs a Flat index; {self.directory} uses "
                    f"{self.manifest.get('factory')!r}"
                )
            from cmpc.index.torch_search import TorchFlatSearch

            dev = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._torch = TorchFlatSearch(self.features, dev)
            self.backend = f"torch-{torch.device(dev).type}"
            return
        if use_gpu and self.sharded is None:
            self.index, self.on_gpu = maybe_to_gpu(self.index, True)
        self.backend = "faiss-gpu" if self.on_gpu else "faiss"
        if backend == "auto" and not self.on_gpu and self.exact and self.sharded is None:
            vectors = flat_vectors(self.index)  # a view of faiss's own storage: no second copy
            if vectors is not None:
                from cmpc.index.torch_search import TorchFlatSearch

                self._torch_batch = TorchFlatSearch(vectors, "cpu")
                self.backend = f"faiss (torch-cpu for batches of {TORCH_BATCH_MIN}+)"

    @staticmethod
    def _read_faiss(path: Path, mmap: bool = False) -> faiss.Index:
        try:
            return read_faiss(path, mmap)
        except RuntimeError as e:
            first = " ".join(str(e).split())[-160:]
            raise DataError(f"{path} is corrupt (faiss cannot read it: ...{first}); rebuild it with `cmpc index build EXPERIMENT.json`") from None

    # ------------------------------------------------------------------ metadata

    @property
    def ntotal(self) -> int:
        """Number of references N."""
        return int(len(self.ids))

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.manifest["embed_dim"])

    @property
    def crs(self) -> str | None:
        """The map CRS (``"EPSG:n"``), or None when the dataset had none."""
        return self.manifest.get("crs")

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) metres covered by the reference footprints."""
        return tuple(float(v) for v in self.manifest["extent"])  # type: ignore[return-value]

    def check_crs(self, crs: Any, what: str) -> None:
        """Raise :class:`IndexMismatchError` when ``crs`` (of ``what``) differs from the map CRS.

        Unknown CRS on either side (e.g. SN6-CMPC annotations carry none) is not checked.
        """
        if crs is None or self.crs is None:
            return
        if not crs_equal(crs, self.crs):
            raise IndexMismatchError(
                f"{what} are in {normalize_crs(crs)} but index {self.directory} is in {self.crs}; "
                "reproject the queries to the map CRS or build an index from a dataset in their CRS"
            )

    def _h5_strings(self, key: str) -> list[str]:
        if key not in self._strings:
            with h5py.File(self.directory / FEATURES_FILE, "r") as h5:
                self._strings[key] = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in h5[key][:]]
        return self._strings[key]

    @property
    def names(self) -> list[str]:
        """Reference names (annotation file stems), one per row."""
        return self._h5_strings("names")

    @property
    def file_paths(self) -> list[str]:
        """Reference image paths relative to ``<source root>/<split>/imgs/opt/``."""
        return self._h5_strings("file_paths")

    @property
    def source(self) -> np.ndarray:
        """(N,) int32: which entry of ``manifest["sources"]`` each row came from."""
        if self._source is None:
            with h5py.File(self.directory / FEATURES_FILE, "r") as h5:
                self._source = np.asarray(h5["source"][:], dtype=np.int32)
        return self._source

    def reference_path(self, row: int) -> Path | None:
        """The optical image file of reference ``row``, or None when it is no longer there."""
        from cmpc.data.layout import safe_image_path

        src = self.manifest["sources"][int(self.source[row])]
        if "root" not in src:  # references cut from a raster mosaic have no patch files
            return None
        try:
            p = safe_image_path(src["root"], src["split"], "opt", self.file_paths[row])
        except DataError:
            return None
        return p if p.is_file() else None

    # ------------------------------------------------------------------ features

    @property
    def features(self) -> np.ndarray:
        """(N, D) float32 reference embeddings, read from ``features.h5`` on first use."""
        if self._features is None:
            with h5py.File(self.directory / FEATURES_FILE, "r") as h5:
                self._features = np.asarray(h5["features"][:], dtype=np.float32)
        return self._features

    def _fits_in_memory(self) -> bool:
        return self._features is not None or self.ntotal * self.dim * 4 <= _IN_MEMORY_BYTES

    def iter_features(self, chunk_rows: int = _CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, features (C, D) float32)`` over all references, C <= chunk_rows.

        Small maps are served from RAM; large ones stream from HDF5 (bounded memory).
        """
        if self._fits_in_memory():
            f = self.features
            for s in range(0, self.ntotal, chunk_rows):
                yield s, f[s : s + chunk_rows]
            return
        with h5py.File(self.directory / FEATURES_FILE, "r") as h5:
            ds = h5["features"]
            for s in range(0, self.ntotal, chunk_rows):
                yield s, np.asarray(ds[s : s + chunk_rows], dtype=np.float32)

    def gather_features(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) float32 features of the given rows (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._fits_in_memory():
            return self.features[rows]
        uniq, inverse = np.unique(rows, return_inverse=True)
        with h5py.File(self.directory / FEATURES_FILE, "r") as h5:
            got = np.asarray(h5["features"][uniq], dtype=np.float32)  # h5py wants increasing indices
        return got[inverse]

    def rows_of_id(self, location_id: int) -> np.ndarray:
        """Rows whose location id is ``location_id`` (usually one; empty when absent)."""
        lo = np.searchsorted(self._ids_sorted, location_id, side="left")
        hi = np.searchsorted(self._ids_sorted, location_id, side="right")
        return self._id_order[lo:hi]

    def correct_scores(self, query_emb: np.ndarray, query_ids: np.ndarray, allowed_mask: np.ndarray | None = None) -> np.ndarray:
        """(B,) exact cosine of each query with its correct reference (best row of its id).

        ``-inf`` where the id is unknown (-1), absent from the map, or excluded by ``allowed_mask``.
        """
        out = np.full(len(query_ids), -np.inf, dtype=np.float32)
        for i, qid in enumerate(np.asarray(query_ids, dtype=np.int64)):
            if qid < 0:
                continue
            rows = self.rows_of_id(int(qid))
            if allowed_mask is not None:
                rows = rows[allowed_mask[rows]]
            if len(rows):
                out[i] = float(np.max(self.gather_features(rows) @ query_emb[i]))
        return out

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k references for each query embedding.

        ``queries``: (B, D) float32 L2-normalised. ``allowed``: optional rows that may be
        returned (a prior); searched with a faiss ``IDSelectorBatch`` where the index type
        supports it, else exactly over the subset. Returns ``(scores (B, k'), rows (B, k'))``,
        cosine similarities descending, with ``k' = min(k, number of candidates)``.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexMismatchError(f"query embeddings have shape {q.shape} but index {self.directory} holds dim {self.dim}")
        if self.milvus is not None:
            return self._milvus_search(q, k, allowed)
        if allowed is None:
            k_eff = min(int(k), self.ntotal)
            if len(q) == 0 or k_eff == 0:
                return np.zeros((len(q), k_eff), np.float32), np.zeros((len(q), k_eff), np.int64)
            if self._torch is not None:
                return self._torch.search(q, k_eff)
            if self._torch_batch is not None and len(q) >= TORCH_BATCH_MIN:
                return self._torch_batch.search(q, k_eff)
            scores, rows = self.index.search(q, k_eff)
            rows = rows.astype(np.int64)
            bad = (rows < 0).any(axis=1)  # HNSW may return fewer than k for tiny graphs
            if bad.any():
                s2, r2 = self._exact_search(q[bad], k_eff, None)
                scores[bad], rows[bad] = s2, r2
            return scores.astype(np.float32), rows
        allowed = np.unique(np.asarray(allowed, dtype=np.int64))
        k_eff = min(int(k), len(allowed))
        if len(q) == 0 or k_eff == 0:
            return np.zeros((len(q), k_eff), np.float32), np.zeros((len(q), k_eff), np.int64)
        if len(allowed) == self.ntotal:
            return self.search(q, k_eff, None)
        if self._torch is not None:
            return self._exact_search(q, k_eff, allowed)
        if self.sharded is not None:
            return self._sharded_filtered_search(q, k_eff, allowed)
        params = filtered_search_params(self.index, allowed, self.nprobe, self.ef_search)
        if params is None:
            return self._exact_search(q, k_eff, allowed)
        scores, rows = self.index.search(q, k_eff, params=params[0])
        rows = rows.astype(np.int64)
        # Graph/IVF search under a tight filter can run out of candidates: redo those exactly.
        bad = (rows < 0).any(axis=1)
        if bad.any():
            s2, r2 = self._exact_search(q[bad], k_eff, allowed)
            scores[bad], rows[bad] = s2, r2
        return scores.astype(np.float32), rows

    def _milvus_search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Search the Milvus collection; a prior is a bounding-box filter there plus the exact test
        here (:meth:`cmpc.index.milvus.MilvusSearch.search`). Queries that come back short of
        ``k`` candidates (an approximate index under a tight filter) are redone exactly here."""
        if allowed is not None:
            allowed = np.unique(np.asarray(allowed, dtype=np.int64))
            if len(allowed) == self.ntotal:
                allowed = None
        k_eff = min(int(k), self.ntotal if allowed is None else len(allowed))
        if len(q) == 0 or k_eff == 0:
            return np.zeros((len(q), k_eff), np.float32), np.zeros((len(q), k_eff), np.int64)
        scores, rows = self.milvus.search(q, k_eff, allowed, self.positions)
        bad = (rows < 0).any(axis=1)
        if bad.any():
            s2, r2 = self._exact_search(q[bad], k_eff, allowed)
            scores[bad], rows[bad] = s2, r2
        return scores.astype(np.float32), rows.astype(np.int64)

    def _sharded_filtered_search(self, q: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Filtered search shard by shard (shard-local selectors), merged into the global top-k."""
        assert self.sharded is not None
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_r = np.zeros((len(q), 0), dtype=np.int64)
        for first, sub in self.sharded.shards:
            local = allowed[(allowed >= first) & (allowed < first + sub.ntotal)] - first
            if len(local) == 0:
                continue
            kk = min(k, len(local))
            params = filtered_search_params(sub, local, self.nprobe, self.ef_search)
            if params is None:
                s, r = self._exact_search(q, kk, local + first)
            else:
                s, r = sub.search(q, kk, params=params[0])
                r = r.astype(np.int64)
                bad = (r < 0).any(axis=1)
                r = np.where(r >= 0, r + first, -1)
                if bad.any():
                    s2, r2 = self._exact_search(q[bad], kk, local + first)
                    s[bad], r[bad] = s2, r2
            best_s, best_r = merge_topk(best_s, best_r, s.astype(np.float32), r, k)
        return best_s, best_r

    def _exact_search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product over all rows or ``allowed`` rows, in chunks."""
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        best_r = np.zeros((len(q), 0), dtype=np.int64)
        if allowed is None:
            chunks = ((np.arange(s, s + len(f)), f) for s, f in self.iter_features())
        else:
            chunks = ((allowed[s : s + _CHUNK_ROWS], self.gather_features(allowed[s : s + _CHUNK_ROWS])) for s in range(0, len(allowed), _CHUNK_ROWS))
        for rows, f in chunks:
            s = q @ f.T
            best_s, best_r = merge_topk(best_s, best_r, s, np.broadcast_to(rows, s.shape), k)
        return best_s, best_r


def merge_topk(
    best_s: np.ndarray, best_r: np.ndarray, new_s: np.ndarray, new_r: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (B, *) candidate lists into the top-k by score, descending (ties: lower row first)."""
    s = np.concatenate([best_s, new_s], axis=1)
    r = np.concatenate([best_r, new_r], axis=1)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(s, part, axis=1)
        r = np.take_along_axis(r, part, axis=1)
    order = np.lexsort((r, -s), axis=1) if s.shape[1] else np.zeros_like(r)
    return np.take_along_axis(s, order, axis=1).astype(np.float32), np.take_along_axis(r, order, axis=1).astype(np.int64)
