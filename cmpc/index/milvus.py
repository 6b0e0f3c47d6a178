"""Milvus as the vector engine of a reference index (``index.engine = "milvus"``).

FAISS in-process stays the embedded default (fastest on one machine, no server). With
``index.engine = "milvus"`` the vectors live in a Milvus collection instead of
``index.faiss``; everything else of ``index/<name>/`` is unchanged (``features.h5`` with ids,
positions and features, ``footprints.gpkg``, ``manifest.json``), so ``cmpc index build``,
``cmpc localize`` and ``test.py`` work the same on either engine.

``index.uri``:

- null: Milvus Lite in ``index/<name>/milvus.db`` (a folder Milvus Lite manages; built in
  the temporary folder and renamed into place with the rest of the index, so the build
  stays atomic);
- a local path ending in ``.db``: Milvus Lite there (several indexes may share one file,
  one collection each; Milvus Lite allows one process per file);
- ``http(s)://host:19530``: a Milvus server or cluster, through the same client code
  (``MILVUS_TOKEN`` in the environment: ``user:password`` or an API key, when it needs one).

The collection (``cmpc_<index name>_<name hash>_<build id>``; a new one per build, named in
the manifest, so a rebuild never disturbs the index being served until the new manifest is
in place) holds one entity per reference row: ``row`` (primary key = the row of
``features.h5``), ``ref_id`` (location id), ``x``, ``y`` (centre, map CRS metres) and
``embedding``. The manifest's hashes (checkpoint SHA-256, SHA-256 of the features in row
order, count, dimension) are also stored as collection properties and compared on load:
a collection that is not the one the manifest describes is refused.

Index types (:func:`milvus_index_spec`): ``index.factory`` is mapped to what Milvus offers
(Milvus Lite 3.2: BRUTE_FORCE/FLAT, IVF_FLAT, IVF_SQ8, HNSW, HNSW_SQ; a server also
IVF_PQ): ``Flat`` -> FLAT (exact), ``HNSW<M>`` -> HNSW (efConstruction 40 like faiss,
``ef`` = ``index.ef_search`` at query time), ``IVF<n>,Flat`` -> IVF_FLAT, ``IVF<n>,SQ8`` ->
IVF_SQ8, ``IVF<n>,PQ<m>...`` -> IVF_PQ (servers only) with ``nprobe`` = ``index.nprobe``.
``auto`` follows :func:`cmpc.index.factory.choose_factory` (Flat, HNSW32, then IVF).

Position priors: a bounding-box filter on ``x``/``y`` runs inside Milvus, with more
candidates fetched than asked (in proportion to how many references of the box the exact
prior keeps), then the exact disc/polygon test (the allowed rows) on what comes back
(:meth:`MilvusSearch.search`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from cmpc.errors import ConfigError, DataError, IndexMismatchError

#: Milvus Lite database of an index when ``index.uri`` is null (inside ``index/<name>/``).
DEFAULT_DB = "milvus.db"
#: Largest ``limit`` (top-k) a Milvus search takes.
MAX_LIMIT = 16_384
#: Queries per search call.
QUERY_BATCH = 1024
#: Rows per insert call.
INSERT_BATCH = 4096
#: Collection properties holding the manifest's hashes (compared on load).
PROP_CHECKPOINT = "cmpc.checkpoint_hash"
PROP_FEATURES = "cmpc.features_sha256"
PROP_COUNT = "cmpc.count"
PROP_DIM = "cmpc.embed_dim"
PROP_INDEX = "cmpc.index_name"
_REMOTE = ("http", "https", "tcp", "grpc", "unix")
#: What pip installs for this engine.
INSTALL_HINT = "pip install 'cmpc[milvus]' (pymilvus + milvus-lite)"


def _pymilvus():  # noqa: ANN202 - the module
    try:
        import pymilvus
    except ImportError:
        raise ConfigError(f"index.engine=milvus needs pymilvus: {INSTALL_HINT}") from None
    # Milvus Lite logs every refused request with a traceback; our errors say it in one line.
    for name in ("pymilvus", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def is_remote(uri: str) -> bool:
    """True for a server address (``http(s)://``, ``tcp://``, ...), False for a local Milvus Lite file."""
    return urlparse(str(uri)).scheme.lower() in _REMOTE


def check_uri(uri: str | None) -> None:
    """One-line ConfigError for an ``index.uri`` Milvus cannot open (before any work)."""
    if uri is None:
        return
    u = str(uri).strip()
    if not u:
        raise ConfigError("index.uri is empty; give a path ending in .db (Milvus Lite), http://host:19530, or null")
    if is_remote(u):
        p = urlparse(u)
        if not p.hostname:
            raise ConfigError(f"index.uri {u!r} has no host; use e.g. http://milvus-host:19530")
        return
    if "://" in u:
        raise ConfigError(f"index.uri {u!r}: unknown scheme; use a local path ending in .db or http(s)://host:19530")
    if not u.endswith(".db"):
        raise ConfigError(f"index.uri {u!r}: a local Milvus Lite database must end in .db (e.g. index/milvus.db)")


def stored_uri(uri: str | None) -> str:
    """What the manifest records: ``milvus.db`` (inside the index folder) for null, an absolute
    path for a local file, the address for a server."""
    check_uri(uri)
    if uri is None:
        return DEFAULT_DB
    return str(uri) if is_remote(str(uri)) else os.path.abspath(str(uri))


def connect_uri(stored: str, folder: Path) -> str:
    """The URI to connect to for a manifest's ``uri`` and the index ``folder`` it lives in."""
    if is_remote(stored) or os.path.isabs(stored):
        return stored
    return str((folder / stored).absolute())


def collection_name(index_name: str, build_id: str | None = None) -> str:
    """``cmpc_<index name, sanitised>_<6 hex of the name's hash>_<8 hex build id>``."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", index_name)[:120]
    tag = hashlib.sha1(index_name.encode("utf-8")).hexdigest()[:6]
    return f"cmpc_{safe}_{tag}_{build_id or uuid.uuid4().hex[:8]}"


def _collection_pattern(index_name: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(collection_name(index_name, "x")[:-1]) + "[0-9a-f]{8}$")


# --------------------------------------------------------------------------- index types


def milvus_index_spec(factory: str, n_references: int, dim: int) -> dict[str, Any]:
    """The Milvus index for a (resolved) faiss factory string: ``{"index_type", "params", "factory"}``.

    One-line ConfigError for strings without a Milvus equivalent.
    """
    from cmpc.index.factory import choose_factory

    f = factory.replace(" ", "")
    if f.lower() == "auto":
        f = choose_factory(n_references, dim)
    if f == "Flat":
        return {"index_type": "FLAT", "params": {}, "factory": f}
    m = re.fullmatch(r"HNSW(\d+)(?:,Flat)?", f)
    if m:
        return {"index_type": "HNSW", "params": {"M": int(m.group(1)), "efConstruction": 40}, "factory": f}
    m = re.fullmatch(r"IVF(\d+),(Flat|SQ8|PQ(\d+)(?:x(\d+))?)(?:,Refine\((?:SQ8|Flat)\))?", f)
    if m:
        nlist = int(m.group(1))
        if m.group(2) == "Flat":
            return {"index_type": "IVF_FLAT", "params": {"nlist": nlist}, "factory": f}
        if m.group(2) == "SQ8":
            return {"index_type": "IVF_SQ8", "params": {"nlist": nlist}, "factory": f}
        return {"index_type": "IVF_PQ", "params": {"nlist": nlist, "m": int(m.group(3)), "nbits": int(m.group(4) or 8)}, "factory": f}
    raise ConfigError(
        f"index.factory {factory!r} has no Milvus equivalent; with index.engine=milvus use auto, Flat, HNSW32, "
        "IVF1024,Flat, IVF1024,SQ8 or IVF1024,PQ64 (a server)"
    )


def search_params(spec: dict[str, Any], k: int, nprobe: int, ef_search: int) -> dict[str, Any]:
    """Milvus ``search_params`` for the index of ``spec`` and a top-``k`` search."""
    t = spec["index_type"]
    params: dict[str, Any] = {}
    if t.startswith("IVF"):
        params["nprobe"] = int(min(nprobe, spec["params"]["nlist"]))
    elif t.startswith("HNSW"):
        params["ef"] = int(max(ef_search, k))
    return {"metric_type": "IP", "params": params}


# --------------------------------------------------------------------------- the collection


class MilvusCollection:
    """One collection of one Milvus database (Lite file or server), opened with pymilvus."""

    def __init__(self, uri: str, name: str) -> None:
        self.uri = uri
        self.name = name
        self.local = not is_remote(uri)
        pm = _pymilvus()
        if self.local and not Path(uri).parent.is_dir():
            raise DataError(f"Milvus Lite database {uri}: its folder does not exist")
        token = os.environ.get("MILVUS_TOKEN", "") if not self.local else ""
        try:
            self.client = pm.MilvusClient(uri=uri, token=token)
        except Exception as e:  # pymilvus raises MilvusException / ConnectionConfigException / grpc errors
            raise DataError(f"cannot open Milvus at {uri} ({_reason(e)}); {self._hint()}") from None

    def _hint(self) -> str:
        if self.local:
            return "Milvus Lite allows one process per database file: stop the other process, or serve it with a Milvus server"
        return "check that the Milvus server is running and reachable (and MILVUS_TOKEN when it needs one)"

    def _call(self, what: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise DataError(f"Milvus {what} failed on collection {self.name} at {self.uri}: {_reason(e)}") from None

    # ---- building
    def create(self, dim: int) -> None:
        pm = _pymilvus()
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", pm.DataType.INT64, is_primary=True)
        schema.add_field("ref_id", pm.DataType.INT64)
        schema.add_field("x", pm.DataType.DOUBLE)
        schema.add_field("y", pm.DataType.DOUBLE)
        schema.add_field("embedding", pm.DataType.FLOAT_VECTOR, dim=int(dim))
        if self.exists():
            self.drop()
        self._call("create_collection", self.client.create_collection, self.name, schema=schema)

    def insert(self, rows: np.ndarray, ids: np.ndarray, positions: np.ndarray, feats: np.ndarray) -> None:
        """Insert references (row numbers, location ids, (n, 2) centres, (n, D) float32 embeddings)."""
        for s in range(0, len(rows), INSERT_BATCH):
            sl = slice(s, s + INSERT_BATCH)
            data = [
                {"row": int(r), "ref_id": int(i), "x": float(p[0]), "y": float(p[1]), "embedding": f}
                for r, i, p, f in zip(rows[sl], ids[sl], positions[sl], np.asarray(feats[sl], dtype=np.float32))
            ]
            self._call("insert", self.client.insert, self.name, data)

    def finish(self, spec: dict[str, Any], properties: dict[str, str]) -> None:
        """Flush, build the vector index of ``spec``, set the properties, load for search."""
        self._call("flush", self.client.flush, self.name)
        ip = self.client.prepare_index_params()
        ip.add_index("embedding", index_type=spec["index_type"], metric_type="IP", params=dict(spec["params"]))
        try:
            self.client.create_index(self.name, ip)
        except Exception as e:
            raise ConfigError(
                f"Milvus at {self.uri} cannot build a {spec['index_type']} index (index.factory {spec['factory']!r}): {_reason(e)}"
            ) from None
        self._call("alter_collection_properties", self.client.alter_collection_properties, self.name, properties=properties)
        self.load()

    # ---- reading
    def exists(self) -> bool:
        return bool(self._call("has_collection", self.client.has_collection, self.name))

    def load(self) -> None:
        self._call("load_collection", self.client.load_collection, self.name)

    def properties(self) -> dict[str, str]:
        d = self._call("describe_collection", self.client.describe_collection, self.name)
        return {str(k): str(v) for k, v in (d.get("properties") or {}).items()}

    def row_count(self) -> int:
        return int(self._call("get_collection_stats", self.client.get_collection_stats, self.name).get("row_count", -1))

    def list_collections(self) -> list[str]:
        return list(self._call("list_collections", self.client.list_collections))

    def search(self, q: np.ndarray, limit: int, params: dict[str, Any], expr: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(scores (B, limit) float32, rows (B, limit) int64; -inf / -1 where fewer came back)."""
        limit = int(min(limit, MAX_LIMIT))
        scores = np.full((len(q), limit), -np.inf, dtype=np.float32)
        rows = np.full((len(q), limit), -1, dtype=np.int64)
        for s in range(0, len(q), QUERY_BATCH):
            batch = [np.asarray(v, dtype=np.float32) for v in q[s : s + QUERY_BATCH]]
            res = self._call("search", self.client.search, self.name, data=batch, limit=limit, filter=expr,
                             output_fields=[], search_params=params, anns_field="embedding")
            for i, hits in enumerate(res, start=s):
                n = min(len(hits), limit)
                if n:
                    rows[i, :n] = [h["row"] if "row" in h else h["id"] for h in list(hits)[:n]]
                    scores[i, :n] = [h["distance"] for h in list(hits)[:n]]
        return scores, rows

    # ---- lifecycle
    def drop(self) -> None:
        self._call("drop_collection", self.client.drop_collection, self.name)

    def drop_other_builds(self, index_name: str, keep: set[str]) -> list[str]:
        """Drop this index's collections from earlier (failed or replaced) builds, except ``keep``."""
        pat = _collection_pattern(index_name)
        gone = []
        for c in self.list_collections():
            if pat.match(c) and c not in keep:
                self._call("drop_collection", self.client.drop_collection, c)
                gone.append(c)
        return gone

    def close(self, release_lite: bool = False) -> None:
        """Close the client; ``release_lite``: also stop this process's Milvus Lite server of the
        file (so that its folder can be moved or replaced; other clients of it here stop working)."""
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        if self.local and release_lite:
            try:
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self.uri)
            except ImportError:
                pass


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split())
    m = re.search(r"message=(.*?)\)?>?$", text)
    return (m.group(1) if m else text)[:240] or type(e).__name__


# --------------------------------------------------------------------------- build and load


def fill_milvus(
    folder: Path, h5: Any, factory: str, dim: int, *, index_name: str, uri: str | None, checkpoint_hash: str, chunk_rows: int = 65_536,
) -> dict[str, Any]:
    """Create a new collection and fill it from ``h5`` (``features.h5`` open in the build folder
    ``folder``): every row, in order. Returns the ``filled`` entry :func:`cmpc.index.writer.index_manifest`
    turns into the manifest's ``milvus`` section."""
    n_total = int(h5["features"].shape[0])
    spec = milvus_index_spec(factory, n_total, dim)
    stored = stored_uri(uri)
    build_id = uuid.uuid4().hex[:8]
    name = collection_name(index_name, build_id)
    uri_now = connect_uri(stored, folder)
    with contextlib.ExitStack() as stack:
        if not is_remote(stored) and os.path.isabs(stored):
            # a Milvus Lite file outside the index folder may hold other indexes: one writer at a time
            from cmpc.utils.locks import exclusive, lock_path

            stack.enter_context(exclusive(lock_path(stored), what="write to the Milvus Lite database", target=stored))
        coll = MilvusCollection(uri_now, name)
        sha = _fill(coll, h5, spec, dim, n_total, chunk_rows, checkpoint_hash, index_name)
    milvus = {
        "uri": stored, "collection": name, "index_type": spec["index_type"], "index_params": spec["params"],
        "metric": "IP", "features_sha256": sha, "lite": not is_remote(stored),
    }
    return {"trained_on": 0, "built_on_gpu": False, "shards": None, "milvus": milvus, "factory": spec["factory"]}


def _fill(coll: MilvusCollection, h5: Any, spec: dict[str, Any], dim: int, n_total: int, chunk_rows: int, checkpoint_hash: str,
          index_name: str) -> str:
    """Create and fill ``coll`` from ``h5``; the features' SHA-256. Dropped again on any failure."""
    name = coll.name
    sha = hashlib.sha256()
    try:
        coll.create(dim)
        for s in range(0, n_total, chunk_rows):
            e = min(n_total, s + chunk_rows)
            feats = np.ascontiguousarray(h5["features"][s:e], dtype=np.float32)
            sha.update(feats.tobytes())
            coll.insert(np.arange(s, e, dtype=np.int64), np.asarray(h5["ids"][s:e]), np.asarray(h5["positions"][s:e]), feats)
        props = {PROP_CHECKPOINT: checkpoint_hash, PROP_FEATURES: sha.hexdigest(), PROP_COUNT: str(n_total), PROP_DIM: str(int(dim)),
                 PROP_INDEX: index_name}
        coll.finish(spec, props)
        if coll.row_count() != n_total:
            raise DataError(f"Milvus collection {name} at {coll.uri} holds {coll.row_count()} rows after inserting {n_total}")
    except BaseException:
        try:
            coll.drop()  # no half-built collection left behind (a crash leaves one: dropped by the next build)
        except Exception:  # noqa: BLE001
            pass
        coll.close(release_lite=True)
        raise
    coll.close(release_lite=True)
    return sha.hexdigest()


def drop_replaced(old_manifest: dict[str, Any] | None, old_folder: Path, new_manifest: dict[str, Any]) -> None:
    """After a rebuild is in place: drop the collection of the index it replaced (when it lived
    outside the old folder, which is gone) and leftovers of interrupted builds of this index."""
    new = new_manifest.get("milvus") or {}
    keep = {new.get("collection")}
    uris = set()
    old = (old_manifest or {}).get("milvus") or {}
    for m in (old, new):
        u = m.get("uri")
        if u and (is_remote(u) or os.path.isabs(u)):
            uris.add(u)
    for u in uris:
        try:
            coll = MilvusCollection(u, new.get("collection") or "x")
        except (DataError, ConfigError):
            continue
        try:
            coll.drop_other_builds(str(new_manifest.get("name")), {c for c in keep if c})
        except DataError:
            pass
        finally:
            coll.close(release_lite=True)


class MilvusSearch:
    """Search side of a Milvus-engine index (what :class:`cmpc.index.store.ReferenceIndex` uses
    instead of a faiss index): ``ntotal``, ``d`` and :meth:`search`."""

    def __init__(self, folder: Path, manifest: dict[str, Any], nprobe: int, ef_search: int) -> None:
        m = manifest.get("milvus") or {}
        if not m.get("collection") or not m.get("uri"):
            raise DataError(f"{folder}/manifest.json names engine milvus but no collection/uri; rebuild it with `cmpc index build EXPERIMENT.json`")
        self.stored_uri = str(m["uri"])
        self.uri = connect_uri(self.stored_uri, folder)
        if not is_remote(self.uri) and not Path(self.uri).exists():
            raise DataError(f"index {folder} is incomplete: its Milvus Lite database {self.uri} is missing; rebuild it with `cmpc index build EXPERIMENT.json`")
        self.spec = {"index_type": m.get("index_type", "FLAT"), "params": dict(m.get("index_params") or {})}
        self.d = int(manifest["embed_dim"])
        self.nprobe, self.ef_search = int(nprobe), int(ef_search)
        self.coll = MilvusCollection(self.uri, str(m["collection"]))
        try:
            self._check(folder, manifest, m)
            self.ntotal = self.coll.row_count()
            self.coll.load()
        except BaseException:
            self.close()
            raise

    @property
    def lite(self) -> bool:
        return not is_remote(self.uri)

    def _check(self, folder: Path, manifest: dict[str, Any], m: dict[str, Any]) -> None:
        if not self.coll.exists():
            raise DataError(
                f"Milvus collection {self.coll.name} of index {folder} is not at {self.uri}; "
                "rebuild it with `cmpc index build EXPERIMENT.json`"
            )
        props = self.coll.properties()
        want = {PROP_CHECKPOINT: str(manifest.get("checkpoint", {}).get("hash")), PROP_FEATURES: str(m.get("features_sha256")),
                PROP_COUNT: str(manifest.get("count")), PROP_DIM: str(manifest.get("embed_dim"))}
        for key, value in want.items():
            got = props.get(key)
            if got != value:
                raise IndexMismatchError(
                    f"Milvus collection {self.coll.name} at {self.uri} has {key}={(got or 'unset')[:12]} but {folder}/manifest.json "
                    f"says {value[:12]}: the collection is not the one this index was built with; rebuild it with `cmpc index build EXPERIMENT.json`"
                )

    def search(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None = None, positions: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, rows) for queries ``q``; -inf/-1 where Milvus returned fewer.

        ``allowed`` (sorted rows, with ``positions`` (N, 2) of all rows): a bounding-box filter
        expression on ``x``/``y`` in Milvus, ``limit`` raised by the share of the box's
        references the exact prior keeps (x 2, + 16), then only allowed rows are kept.
        """
        if allowed is None:
            return self.coll.search(q, k, search_params(self.spec, k, self.nprobe, self.ef_search))
        assert positions is not None
        pa = positions[allowed]
        (x0, y0), (x1, y1) = (float(v) for v in pa.min(axis=0)), (float(v) for v in pa.max(axis=0))
        in_box = int(np.count_nonzero((positions[:, 0] >= x0) & (positions[:, 0] <= x1) & (positions[:, 1] >= y0) & (positions[:, 1] <= y1)))
        limit = int(min(MAX_LIMIT, in_box, math.ceil(k * in_box / max(1, len(allowed))) * 2 + 16))
        expr = f"x >= {x0!r} and x <= {x1!r} and y >= {y0!r} and y <= {y1!r}"
        s, r = self.coll.search(q, limit, search_params(self.spec, limit, self.nprobe, self.ef_search), expr)
        ok = np.isin(r, allowed)  # the exact disc / polygon test: allowed rows only
        s = np.where(ok, s, -np.inf).astype(np.float32)
        r = np.where(ok, r, -1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)

    def close(self) -> None:
        """Close the client (and stop a Milvus Lite server of a database inside the index folder,
        which a rebuild replaces)."""
        self.coll.close(release_lite=self.lite and not os.path.isabs(self.stored_uri))
