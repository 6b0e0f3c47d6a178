"""Which FAISS index to build, and how to create, train, tune, filter and move it.

Every index compares L2-normalised embeddings by inner product (= cosine similarity), so
``faiss.index_factory`` is always called with ``METRIC_INNER_PRODUCT``. Row numbers in the
index are insertion order (0..N-1); location ids, positions and names live beside it in
``features.h5``, so no ``IndexIDMap`` is needed and ``add`` simply appends rows.

The one place that decides what ``index.factory = "auto"`` means is :func:`choose_factory`.
"""

from __future__ import annotations

import math
import re

import faiss
import numpy as np

from cmpc.errors import ConfigError

# Thresholds measured on real embeddings (D = 256, 10k / 100k / 1M references, one thread;
# docs/BENCHMARKS.md "Index", benchmarks/bench_index.py):
# - Flat is exact and builds instantly; at 100k it takes 6 ms per single query (2.5 ms batched,
#   about the cost of embedding the query), at 10k 0.4 ms. Below 50k it stays under ~3 ms.
# - HNSW32 (efSearch 64, the default) at 1M: 0.36 ms per query, recall@10 0.996 against exact,
#   1.28 GB of RAM, 4.5 min to build on one core. It beats IVF-Flat and IVF-PQ+refine on
#   speed and recall at every size; its cost is memory (~1.25 kB per reference at D = 256).
# - IVF-PQ+refine (IVF sqrt(N), PQ D/4 bytes, SQ8 refinement, k_factor 8) at 1M: 0.5 ms,
#   recall@10 0.964 (nprobe 16), 325 MB: a quarter of HNSW's memory, for maps whose HNSW
#   would not fit in RAM.
#: Below this many references an exact (Flat) index is fast enough and exact.
AUTO_FLAT_MAX = 50_000
#: Below this many references HNSW32 (~1.25 kB/reference at D = 256: 5 GB at 4M); above it IVF-PQ.
AUTO_HNSW_MAX = 4_000_000
#: Training points per PQ centroid (see :func:`_no_polysemous_training`).
PQ_POINTS_PER_CENTROID = 64
#: A Refine(...) index re-scores this many times k compressed-code candidates exactly
#: (8: recall@10 0.948 -> 0.964 at 1M references for +2 % time; 16 adds nothing).
REFINE_K_FACTOR = 8.0


def choose_factory(n_references: int, dim: int) -> str:
    """The factory string used for ``index.factory = "auto"`` (evidence in the comments above).

    Flat below :data:`AUTO_FLAT_MAX` references, HNSW32 below :data:`AUTO_HNSW_MAX`, then
    IVF with about sqrt(N) cells (a power of two: k-means training stays minutes, and each
    probe scans ~sqrt(N) codes), PQ codes of ``dim/4`` bytes and an 8-bit scalar-quantised
    refinement of the shortlist.
    """
    if n_references < AUTO_FLAT_MAX:
        return "Flat"
    if n_references < AUTO_HNSW_MAX:
        return "HNSW32"
    nlist = int(min(65_536, 2 ** round(math.log2(math.sqrt(n_references)))))
    m = _largest_divisor_at_most(dim, max(1, dim // 4))
    return f"IVF{nlist},PQ{m}x8,Refine(SQ8)"


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for m in range(min(cap, n), 0, -1):
        if n % m == 0:
            return m
    return 1


def resolve_factory(factory: str, n_references: int, dim: int) -> str:
    """``auto`` -> :func:`choose_factory`; anything else is returned as given (validated)."""
    name = factory.strip()
    if name.lower() == "auto":
        name = choose_factory(n_references, dim)
    new_index(name, dim)  # fail early, before any embedding work, on a malformed string
    return name


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index for ``dim``-dimensional vectors from a factory string."""
    if "IDMap" in factory:
        raise ConfigError(f"index.factory {factory!r}: IDMap is not needed (ids are stored beside the index); drop it")
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(
            f"index.factory {factory!r} is not a valid faiss factory string for dim {dim} "
            f"({_faiss_reason(e)}); try Flat, HNSW32, IVF256,Flat or IVF256,PQ16,Refine(Flat)"
        ) from None
    _no_polysemous_training(index)
    return index


def _no_polysemous_training(index: faiss.Index) -> None:
    """Cheaper PQ training: no polysemous code training (it only serves Hamming-filtered
    search, which we do not use, and is the slowest part of training a PQ index), and
    :data:`PQ_POINTS_PER_CENTROID` training points per codebook centroid."""
    real = faiss.downcast_index(index)
    if isinstance(real, faiss.IndexRefine):
        _no_polysemous_training(real.base_index)
        return
    if isinstance(real, faiss.IndexPreTransform):
        _no_polysemous_training(real.index)
        return
    if hasattr(real, "do_polysemous_training"):
        real.do_polysemous_training = False
    if hasattr(real, "pq"):
        # PQ codebooks: 64 training points per centroid (faiss default 256) are plenty for
        # 256 centroids and make training 4x cheaper (minutes at 1M references on a CPU).
        real.pq.cp.max_points_per_centroid = PQ_POINTS_PER_CENTROID


def _faiss_reason(e: Exception) -> str:
    """The useful last line of a faiss C++ exception message."""
    text = " ".join(str(e).split())
    m = re.search(r" at \S+:\d+: (?:Error: )?(.*)$", text)  # drop "Error in <C++ signature> at file:line:"
    return (m.group(1) if m else text)[:200]


def training_sample_size(index: faiss.Index, n_available: int) -> int:
    """How many vectors to train an IVF/PQ index on: ~64 per IVF cell, 10k..200k."""
    want = 10_000
    ivf = _ivf(index)
    if ivf is not None:
        want = max(want, 64 * int(ivf.nlist))
    return int(min(n_available, min(want, 200_000)))


def train_index(index: faiss.Index, sample: np.ndarray, factory: str) -> None:
    """Train ``index`` on ``sample`` (n, D) float32; too few points is a one-line ConfigError."""
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    except RuntimeError as e:
        raise ConfigError(
            f"index.factory {factory!r} cannot be trained on {len(sample)} references ({_faiss_reason(e)}); "
            "use Flat or fewer IVF cells / PQ centroids for a map this small"
        ) from None


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_search_defaults(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    """Apply ``nprobe`` (IVF cells visited), ``efSearch`` (HNSW) and the refinement factor
    (:data:`REFINE_K_FACTOR`) where the index has them."""
    ps = faiss.ParameterSpace()
    if _ivf(index) is not None:
        ps.set_index_parameter(index, "nprobe", int(nprobe))
    real = faiss.downcast_index(index)
    if isinstance(real, faiss.IndexRefine):
        real.k_factor = max(float(real.k_factor), REFINE_K_FACTOR)
    base = faiss.downcast_index(real.base_index) if isinstance(real, faiss.IndexRefine) else real
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = int(ef_search)


def filtered_search_params(
    index: faiss.Index, allowed_rows: np.ndarray, nprobe: int, ef_search: int
) -> tuple[faiss.SearchParameters, faiss.IDSelector] | None:
    """Search parameters that restrict results to ``allowed_rows`` (IDSelectorBatch).

    Returns ``(params, selector)`` (keep the selector alive while searching), or None when
    this index type takes no selector (e.g. a bare PQ index or a GPU index): the caller then
    searches the allowed subset exactly.
    """
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_rows, dtype=np.int64))
    real = faiss.downcast_index(index)

    def params_for(ix: faiss.Index) -> faiss.SearchParameters | None:
        if isinstance(ix, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=int(ef_search))
        if isinstance(ix, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe))
        if isinstance(ix, (faiss.IndexFlat, faiss.IndexScalarQuantizer)):
            return faiss.SearchParameters(sel=sel)
        return None

    if isinstance(real, faiss.IndexRefine):
        base = params_for(faiss.downcast_index(real.base_index))
        if base is None:
            return None
        params = faiss.IndexRefineSearchParameters(k_factor=float(real.k_factor), base_index_params=base)
        params._base = base  # the SWIG object does not own base_index_params: keep it alive
        return params, sel
    p = params_for(real)
    return (p, sel) if p is not None else None


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # faiss-cpu builds without the symbol
        return False


def maybe_to_gpu(index: faiss.Index, use_gpu: bool) -> tuple[faiss.Index, bool]:
    """Move ``index`` to all GPUs when asked and possible; (index, on_gpu).

    Index types faiss cannot place on a GPU (HNSW, Refine) stay on the CPU.
    """
    if not (use_gpu and gpu_available()):
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except (RuntimeError, AttributeError):
        return index, False


def to_cpu(index: faiss.Index, on_gpu: bool) -> faiss.Index:
    """The CPU copy of an index (for writing to disk)."""
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """The (N, D) float32 vectors stored in a Flat index, as a view (no copy), or None.

    Valid while ``index`` lives. None for other index types, and when the view does not
    match the stored vectors (e.g. a memory-mapped index keeps them elsewhere).
    """
    real = faiss.downcast_index(index)
    if not isinstance(real, faiss.IndexFlat) or real.ntotal == 0:
        return None
    view = faiss.rev_swig_ptr(real.get_xb(), real.ntotal * real.d).reshape(real.ntotal, real.d)
    last = real.ntotal - 1
    if not (np.array_equal(view[0], real.reconstruct(0)) and np.array_equal(view[last], real.reconstruct(last))):
        return None
    return view
