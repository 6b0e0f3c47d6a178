"""Sharded reference indexes: one map split into several FAISS files searched as one.

A map past one machine's memory is cut into ``index.shards`` contiguous row ranges. Each
shard is an ordinary FAISS index file (``shards/shard_000.faiss`` ...) holding rows
``[first_row, first_row + count)``; the manifest lists them. Indexes that need training
(IVF, PQ) are trained ONCE on a sample of the whole map and every shard starts from a copy
of that trained, empty index, so all shards share one coarse quantizer and one codebook:
their scores are comparable and their inverted lists could be merged into one on-disk IVF.

At query time the shards are opened (optionally memory-mapped, so the OS pages them in from
disk instead of holding them in RAM) into a ``faiss.IndexShards`` with successive ids: a
search fans out to every shard (in threads) and merges the per-shard top-k, and row numbers
come back global. :class:`cmpc.index.store.ReferenceIndex` does this transparently; its
``search`` interface is the same for sharded and single-file indexes. Shards serve a map past
one machine's RAM on one machine; past one machine the index lives in Milvus instead
(``index.engine = "milvus"``, :mod:`cmpc.index.milvus`), which shards and merges itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

SHARD_DIR = "shards"


def shard_ranges(n_rows: int, n_shards: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous (start, stop) row ranges covering 0..n_rows, sizes within one row.

    Fewer ranges when there are fewer rows than shards (no empty shard).
    """
    n_shards = max(1, min(int(n_shards), max(1, int(n_rows))))
    edges = np.linspace(0, n_rows, n_shards + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def shard_file(i: int) -> str:
    """Relative path of shard ``i`` inside an index folder."""
    return f"{SHARD_DIR}/shard_{i:03d}.faiss"


def write_shards(
    folder: Path,
    template: faiss.Index,
    n_rows: int,
    n_shards: int,
    read_rows: Callable[[int, int], np.ndarray],
    chunk_rows: int = 65_536,
    row0: int = 0,
    first_file: int = 0,
) -> list[dict[str, Any]]:
    """Fill copies of the trained, empty ``template`` with ``n_rows`` rows in ``n_shards``
    contiguous ranges and write them one at a time (only one shard in memory).

    ``read_rows(start, stop)`` returns float32 (stop - start, D) features, ``start``/``stop``
    counted from the first new row; their global rows start at ``row0`` (``--add`` appends
    shards after the old ones; files are numbered from ``first_file``). Returns manifest
    entries ``{"file": "shards/shard_000.faiss", "first_row": int, "count": int}``.
    """
    (folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (start, stop) in enumerate(shard_ranges(n_rows, n_shards), start=first_file):
        sub = faiss.clone_index(template)
        for s in range(start, stop, chunk_rows):
            sub.add(np.ascontiguousarray(read_rows(s, min(stop, s + chunk_rows)), dtype=np.float32))
        if sub.ntotal != stop - start:
            raise RuntimeError(f"shard {i} holds {sub.ntotal} rows, expected {stop - start}")  # a bug
        faiss.write_index(sub, str(folder / shard_file(i)))
        entries.append({"file": shard_file(i), "first_row": row0 + start, "count": stop - start})
        del sub
    return entries


def read_faiss(path: Path, mmap: bool = False) -> faiss.Index:
    """``faiss.read_index``, memory-mapped (read-only) when ``mmap``."""
    flags = (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) if mmap else 0
    return faiss.read_index(str(path), flags)


class ShardedIndex:
    """Shards opened as one ``faiss.IndexShards`` (successive ids) plus the per-shard list.

    ``index``: the IndexShards to search (global row numbers). ``shards``: ``[(first_row,
    sub_index)]`` for filtered searches, which run per shard with shard-local selectors.
    The sub-indexes are kept referenced here because ``IndexShards`` does not own them.
    """

    def __init__(self, shards: list[tuple[int, faiss.Index]], dim: int) -> None:
        self.shards = shards
        self.index = faiss.IndexShards(int(dim), True, True)  # threaded, successive ids
        for _, sub in shards:
            self.index.add_shard(sub)

    @classmethod
    def open(cls, folder: Path, entries: list[dict[str, Any]], dim: int, mmap: bool = False) -> ShardedIndex:
        shards = []
        expect = 0
        for e in entries:
            if int(e["first_row"]) != expect:
                raise ValueError(f"shard {e['file']} starts at row {e['first_row']}, expected {expect}")
            sub = read_faiss(folder / e["file"], mmap)
            if sub.ntotal != int(e["count"]):
                raise ValueError(f"shard {e['file']} holds {sub.ntotal} rows, the manifest says {e['count']}")
            shards.append((int(e["first_row"]), sub))
            expect += int(e["count"])
        return cls(shards, dim)
