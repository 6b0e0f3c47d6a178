"""``cmpc train refine`` / ``train_refine.py``: train the scene-graph refiner and fine alignment.

From the training split only:

1. the training references come embedded by the checkpoint (``runs/<name>/emb_best.pt``) in
   the training index the caller hands over (the index step,
   :func:`cmpc.index.build.ensure_train_index`: ``index/<index name>-train/``, checked
   against the checkpoint here); the checkpoint embeds the training SAR queries (cached in
   ``runs/<name>/refine_queries.h5``, keyed by the checkpoint hash);
2. each query's top-k training references form a graph; the GNN learns to score the correct
   one (cross-entropy + ranking margin) and to regress the query position (Huber). Queries
   whose correct reference is *not* in the top-k cannot teach the ranking: they are counted
   (``stats.missing_in_topk``, logged) and train the position head only, unless no
   candidate lies within one reference spacing of them (``stats.unreachable``: no mix of
   the candidates can reach them, they are left out of the position term too);
   the GNN is validated on the places the embedder did not train on (its validation
   block); the other queries' embeddings get noise so their top-k lists are as hard;
3. the dense descriptor of fine alignment is trained on the co-registered SAR queries and
   the stitched optical references (:mod:`cmpc.train.align`);
4. on held-out training queries, the coarse / GNN / aligned errors are measured and the
   alignment peak threshold under which the GNN position is kept is calibrated.

Writes ``runs/<name>/refiner.pt`` (plain data: weights, architecture, k, embedding size,
stats, and ``inputs``: the SHA-256 of the embedder checkpoint, of the training index's
manifest and of the ``refine.align_from`` refiner it was built from, see
:mod:`cmpc.utils.provenance`; the localizer refuses it with any other embedder) and
``runs/<name>/refine_log.jsonl`` (one JSON record per epoch / logging step).

A refiner already trained with the same ``refine`` section on the same ``data.root``, from
the same embedder checkpoint, training index and ``refine.align_from`` file (SHA-256s of
``inputs``) is kept: :func:`train_refiner` returns at once (delete ``refiner.pt`` to
retrain). Anything different retrains.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmpc.config import Experiment
from cmpc.data.layout import positions, read_annotations
from cmpc.data.patches import PatchDataset
from cmpc.errors import CheckpointError, DataError
from cmpc.index.store import ReferenceIndex
from cmpc.localize.refine import REFINER_FILE, GraphRefiner, refiner_embedder_record, refiner_payload, save_refiner
from cmpc.models.checkpoint import checkpoint_hash, default_checkpoint, embed_batches, load_checkpoint, load_embedder
from cmpc.models.descriptor import DenseDescriptor
from cmpc.models.graph import build_graphs, grid_spacing_m
from cmpc.models.refiner import SceneGraphRefiner, refiner_loss
from cmpc.utils import provenance
from cmpc.utils.io import append_jsonl, atomic_path, file_sha256
from cmpc.utils.runtime import resolve_device, seed_everything


def _say(msg: str) -> None:
    print(f"[train refine] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs


def embed_train_queries(exp: Experiment, model, meta: dict[str, Any], device: torch.device) -> tuple[np.ndarray, list]:  # noqa: ANN001
    """(N, D) float32 embeddings of the training SAR queries and their annotations; cached in
    ``runs/<name>/refine_queries.h5`` for the checkpoint that made them."""
    anns = read_annotations(exp.data.root, "train", "sar")
    cache = exp.run_dir / "refine_queries.h5"
    if cache.is_file():
        try:
            with h5py.File(cache, "r") as h5:
                if h5.attrs.get("checkpoint_hash") == meta["hash"] and int(h5["emb"].shape[0]) == len(anns):
                    return np.asarray(h5["emb"][:], dtype=np.float32), anns
        except OSError:
            pass
    img_size = int(meta.get("img_size") or exp.data.img_size)
    ds = PatchDataset(exp.data.root, "train", "sar", img_size, annotations=anns)
    loader = DataLoader(ds, batch_size=64, shuffle=False, num_workers=exp.data.num_workers)
    out = np.zeros((len(anns), model.embed_dim), dtype=np.float32)
    for e, idx in tqdm(embed_batches(model, loader, "sar", device), total=len(loader), desc="embed training queries", unit="batch", leave=False):
        out[idx] = e
    with atomic_path(cache) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("emb", data=out)
            h5.attrs["checkpoint_hash"] = meta["hash"]
    return out, anns


@dataclasses.dataclass
class GraphSet:
    """Training graphs in table form (N queries x k candidates).

    ``q`` (N, D), ``cand`` (N, k, D), ``pos`` (N, k, 2) metres, ``sim`` (N, k),
    ``target`` (N,) slot of the correct candidate or -1, ``target_rel`` (N, 2) true position
    relative to the top-1 in spacing units, ``true_pos`` (N, 2) metres, ``aligned`` (N,) bool,
    ``reachable`` (N,) bool: some candidate lies within one spacing of the true position
    (only those train the position head: no mix of far candidates can reach the others).
    """

    q: torch.Tensor
    cand: torch.Tensor
    pos: torch.Tensor
    sim: torch.Tensor
    target: torch.Tensor
    target_rel: torch.Tensor
    true_pos: np.ndarray
    aligned: np.ndarray
    rows: np.ndarray
    scores: np.ndarray
    reachable: torch.Tensor

    def __len__(self) -> int:
        return len(self.q)


def make_graph_set(q_emb: np.ndarray, anns: list, index, k: int, spacing: float) -> GraphSet:  # noqa: ANN001
    """Search the top-k of every query and tabulate the graph inputs and targets."""
    scores, rows = index.search(q_emb, k)
    if rows.shape[1] < k:
        raise DataError(f"the training map has only {rows.shape[1]} references, fewer than refine.k={k}; lower refine.k")
    ids = index.ids[rows]
    qid = np.array([a.id for a in anns], dtype=np.int64)
    hit = ids == qid[:, None]
    target = np.where(hit.any(1), hit.argmax(1), -1)
    pos = index.positions[rows]
    true = np.array([[a.x, a.y] for a in anns], dtype=np.float64)
    rel = (true - pos[:, 0]) / spacing
    reach = np.linalg.norm(pos - true[:, None], axis=2).min(axis=1) <= spacing
    return GraphSet(
        q=torch.from_numpy(q_emb),
        cand=torch.from_numpy(index.gather_features(rows.reshape(-1)).reshape(len(rows), k, -1)),
        pos=torch.from_numpy(pos),
        sim=torch.from_numpy(scores),
        target=torch.from_numpy(target),
        target_rel=torch.from_numpy(rel).float(),
        true_pos=true,
        aligned=np.array([bool(a.aligned) if a.aligned is not None else False for a in anns]),
        rows=rows,
        scores=scores,
        reachable=torch.from_numpy(reach),
    )


def noisy(q_emb: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Query embeddings plus isotropic Gaussian noise of std ``sigma`` per dimension (scaled
    by 1/sqrt(D) so ``sigma`` is the noise norm relative to the unit vectors), re-normalised."""
    if sigma <= 0:
        return q_emb
    rng = np.random.default_rng(seed)
    n = rng.standard_normal(q_emb.shape).astype(np.float32) * (sigma / np.sqrt(q_emb.shape[1]))
    q = q_emb + n
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def recall_at_1(q_emb: np.ndarray, qid: np.ndarray, index) -> float:  # noqa: ANN001
    """Share of queries whose top-1 reference has their id."""
    _, rows = index.search(q_emb, 1)
    return float(np.mean(index.ids[rows[:, 0]] == qid))


def noise_for_recall(q_emb: np.ndarray, qid: np.ndarray, index, target_r1: float, seed: int = 0) -> float:  # noqa: ANN001
    """Noise ``sigma`` (see :func:`noisy`) under which the training queries' R@1 drops to
    ``target_r1`` (bisection; 0 when they are already no better)."""
    if recall_at_1(q_emb, qid, index) <= target_r1:
        return 0.0
    lo, hi = 0.0, 4.0
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        if recall_at_1(noisy(q_emb, mid, seed), qid, index) > target_r1:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- GNN


def _graphs(gs: GraphSet, idx: np.ndarray, spacing: float, spatial_knn: int, feature_knn: int):  # noqa: ANN202
    i = torch.from_numpy(idx)
    return build_graphs(gs.q[i], gs.cand[i], gs.pos[i], gs.sim[i], spacing, spatial_knn, feature_knn)


@torch.no_grad()
def gnn_metrics(model: SceneGraphRefiner, gs: GraphSet, idx: np.ndarray, spacing: float, spatial_knn: int, feature_knn: int) -> dict[str, float]:
    """Coarse vs GNN on queries ``idx``: R@1, median/mean position error (metres), loss parts."""
    model.eval()
    g = _graphs(gs, idx, spacing, spatial_knn, feature_knn)
    out = model(g)
    i = torch.from_numpy(idx)
    tgt = gs.target[i]
    top = out.scores.argmax(1)
    coarse_err = np.linalg.norm(gs.true_pos[idx] - gs.pos[i, 0].numpy(), axis=1)
    pred = gs.pos[i, 0].numpy() + out.position.double().numpy() * spacing
    gnn_err = np.linalg.norm(gs.true_pos[idx] - pred, axis=1)
    top_pos = gs.pos[i].numpy()[np.arange(len(idx)), top.numpy()]
    rerank_err = np.linalg.norm(gs.true_pos[idx] - top_pos, axis=1)
    _, parts = refiner_loss(out, tgt, gs.target_rel[i], 0.0, 1.0, position_mask=gs.reachable[i])
    return {
        "coarse_r1": float((tgt == 0).float().mean()),
        "refined_r1": float((top == tgt).float().mean()),
        "coarse_median_m": float(np.median(coarse_err)),
        "rerank_median_m": float(np.median(rerank_err)),
        "gnn_median_m": float(np.median(gnn_err)),
        "gnn_mean_m": float(np.mean(gnn_err)),
        "ce": parts["ce"],
        "pos": parts["pos"],
    }


def fit_gnn(
    exp: Experiment,
    gs: GraphSet,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    spacing: float,
    log_path: Path,
    epoch_graphs: Callable[[int], GraphSet] | None = None,
) -> tuple[SceneGraphRefiner, dict[str, Any]]:
    """Train the GNN; keeps the weights of the epoch with the lowest validation loss.

    ``epoch_graphs(epoch)``: the graph set of an epoch (fresh noisy top-k lists), default
    ``gs`` every epoch; validation always uses ``gs``.
    """
    rc = exp.refine
    D = gs.q.shape[1]
    model = SceneGraphRefiner(D, rc.hidden, rc.layers, rc.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, int(np.ceil(len(train_idx) / rc.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rc.lr, total_steps=rc.epochs * steps_per_epoch, pct_start=0.1)
    rng = np.random.default_rng(rc.seed)
    best: tuple[float, dict[str, torch.Tensor], dict[str, float]] | None = None
    t0 = time.perf_counter()
    bar = tqdm(range(rc.epochs), desc="train GNN", unit="epoch", file=sys.stderr)
    for epoch in bar:
        model.train()
        tg = epoch_graphs(epoch) if epoch_graphs is not None else gs
        perm = rng.permutation(train_idx)
        tot = {"loss": 0.0, "ce": 0.0, "rank": 0.0, "pos": 0.0}
        for s in range(0, len(perm), rc.batch_size):
            b = perm[s : s + rc.batch_size]
            g = _graphs(tg, b, spacing, rc.spatial_knn, rc.feature_knn)
            out = model(g)
            ib = torch.from_numpy(b)
            loss, parts = refiner_loss(out, tg.target[ib], tg.target_rel[ib], rc.rank_margin, rc.position_weight, position_mask=tg.reachable[ib])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            tot["loss"] += float(loss.detach()) * len(b)
            for k_ in ("ce", "rank", "pos"):
                tot[k_] += parts[k_] * len(b)
        rec: dict[str, Any] = {"stage": "gnn", "epoch": epoch + 1, **{k_: v / len(perm) for k_, v in tot.items()}, "seconds": round(time.perf_counter() - t0, 2)}
        if len(val_idx):
            vm = gnn_metrics(model, gs, val_idx, spacing, rc.spatial_knn, rc.feature_knn)
            rec["val"] = vm
            score = vm["ce"] + rc.position_weight * vm["pos"]
            if best is None or score < best[0]:
                best = (score, copy.deepcopy(model.state_dict()), vm)
            bar.set_postfix(val_r1=f"{vm['refined_r1']:.3f}", val_med_m=f"{vm['gnn_median_m']:.1f}")
        append_jsonl(log_path, rec)
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    stats: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1), "epochs": rc.epochs}
    if best is not None:
        stats["val_best"] = best[2]
    return model, stats


# --------------------------------------------------------------------------- calibration


def calibrate_min_peak(errors_aligned: np.ndarray, peaks: np.ndarray, errors_fallback: np.ndarray) -> tuple[float, dict[str, float]]:
    """Peak threshold under which the fallback position is kept: minimises the mean error
    capped at 100 m (so a few far misses do not dominate). Returns (threshold, summary)."""
    cands = np.unique(np.concatenate([[-1.0], np.quantile(peaks, np.linspace(0, 0.95, 40))]))
    best_t, best_v = -1.0, np.inf
    for t in cands:
        e = np.where(peaks >= t, errors_aligned, errors_fallback)
        v = float(np.minimum(e, 100.0).mean())
        if v < best_v - 1e-9:
            best_t, best_v = float(t), v
    final = np.where(peaks >= best_t, errors_aligned, errors_fallback)
    return best_t, {"capped_mean_m": best_v, "median_m": float(np.median(final)), "within_5m": float(np.mean(final <= 5)), "within_25m": float(np.mean(final <= 25)), "kept_aligned": float(np.mean(peaks >= best_t))}


# --------------------------------------------------------------------------- main


def embedder_unseen(exp: Experiment, meta: dict[str, Any], anns: list) -> np.ndarray:
    """(N,) bool: training queries at places the embedder did not train on (its validation
    hold-out and the buffer around it, as :func:`cmpc.data.pairs.validation_holdout` draws
    them: the tiler's validation boxes when ``dataset.json`` names them, else the west end
    with the checkpoint's ``train.val_fraction``)."""
    from cmpc.data.layout import read_dataset_meta
    from cmpc.data.pairs import validation_holdout

    refs = read_annotations(exp.data.root, "train", "opt")
    frac = float(((meta.get("experiment") or {}).get("train") or {}).get("val_fraction", exp.train.val_fraction))
    split = validation_holdout(read_dataset_meta(exp.data.root), refs, frac)
    ids = {refs[int(i)].id for i in np.concatenate([split.val, split.buffer])}
    return np.array([a.id in ids for a in anns], dtype=bool)


def train_refiner(exp: Experiment, index_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Train the refiner of ``exp`` on its training split; returns ``runs/<name>/refiner.pt``.

    ``index_dir``: the training references' index, built by ``checkpoint`` (default
    ``runs/<name>/emb_best.pt``): what :func:`cmpc.index.build.ensure_train_index` returns;
    one built by another checkpoint is refused naming both hashes.
    """
    from cmpc.train.align import load_align_data, train_aligner

    rc = exp.refine
    ckpt = default_checkpoint(exp.run_dir, checkpoint)
    ckpt_hash = checkpoint_hash(ckpt)
    done = _already_trained(exp, ckpt_hash, index_dir)
    if done is not None:
        _say(f"{done}: already trained (same refine settings, embedder {provenance.short(ckpt_hash)}); delete {done} to retrain")
        return done
    seed_everything(rc.seed)
    device = resolve_device(exp.train.device)
    run_dir = exp.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "refine_log.jsonl"
    if log_path.exists():
        log_path.unlink()  # one log per training
    t_start = time.perf_counter()
    model, meta = load_embedder(ckpt, device)
    index = ReferenceIndex.load(index_dir, expect_hash=meta["hash"], checkpoint_path=ckpt)
    q_emb, anns = embed_train_queries(exp, model, meta, device)
    spacing = grid_spacing_m(index.positions)
    k = rc.k
    qid = np.array([a.id for a in anns], dtype=np.int64)
    # GNN validation = the places the embedder never trained on (its spatial validation
    # block): their top-k lists look like those of test places. The other training queries
    # were seen by the embedder, so their lists are too easy: noise on their embeddings
    # brings their R@1 down to that of the unseen ones.
    unseen = embedder_unseen(exp, meta, anns)
    rng = np.random.default_rng(rc.seed)
    if unseen.sum() >= 20 and (~unseen).sum() >= 20:
        val_idx, train_idx = np.nonzero(unseen)[0], np.nonzero(~unseen)[0]
        target_r1: float | None = recall_at_1(q_emb[val_idx], qid[val_idx], index)
    else:
        perm = rng.permutation(len(anns))
        n_val = int(round(0.1 * len(anns))) if len(anns) >= 20 else 0
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        target_r1 = None
    seen_r1 = recall_at_1(q_emb[train_idx], qid[train_idx], index)
    if rc.train_noise is not None:
        sigma = float(rc.train_noise)
    elif target_r1 is not None:
        sigma = noise_for_recall(q_emb[train_idx], qid[train_idx], index, target_r1, seed=rc.seed)
    else:
        sigma = 0.0

    def queries_of_epoch(seed: int) -> np.ndarray:
        q = q_emb.copy()
        q[train_idx] = noisy(q_emb[train_idx], sigma, seed)
        return q

    _say(f"R@1 on the training map: seen places {seen_r1:.3f}, unseen places {target_r1}; query noise sigma {sigma:.3f}")
    gs = make_graph_set(queries_of_epoch(10_000 + rc.seed), anns, index, k, spacing)
    missing = gs.target < 0
    n_missing = int(missing.sum())
    stats: dict[str, Any] = {
        "n_queries": len(gs),
        "n_references": int(index.ntotal),
        "spacing_m": spacing,
        "k": k,
        "missing_in_topk": n_missing,
        "missing_in_topk_aligned": int((missing.numpy() & gs.aligned).sum()),
        "missing_in_topk_non_aligned": int((missing.numpy() & ~gs.aligned).sum()),
        "missing_policy": (
            "excluded from the cross-entropy and ranking terms; they still train the position head "
            "when a candidate lies within one reference spacing of the true position"
        ),
        "unreachable": int((~gs.reachable).sum()),
        "unreachable_policy": "no candidate within one spacing of the true position: excluded from the position term too (counted here)",
        "embedder": {"path": str(ckpt), "hash": meta["hash"]},
        "n_val_unseen_by_embedder": int(len(val_idx)) if target_r1 is not None else 0,
        "r1_seen": seen_r1,
        "r1_unseen": target_r1,
        "train_noise": sigma,
        "r1_seen_noisy": float((gs.target[torch.from_numpy(train_idx)] == 0).float().mean()) if len(train_idx) else None,
    }
    _say(
        f"{len(gs)} training queries, {index.ntotal} references, spacing {spacing:.1f} m; "
        f"{n_missing} ({n_missing / max(len(gs), 1):.1%}) have their correct reference outside the top-{k} "
        f"(no ranking loss); {stats['unreachable']} of them have no candidate within {spacing:.0f} m (no position loss either)"
    )
    append_jsonl(log_path, {"stage": "data", **{k_: v for k_, v in stats.items() if k_ != "embedder"}})
    epoch_graphs = (lambda e: make_graph_set(queries_of_epoch(rc.seed * 1000 + e), anns, index, k, spacing)) if sigma > 0 else None
    gnn, stats["gnn"] = fit_gnn(exp, gs, train_idx, val_idx, spacing, log_path, epoch_graphs)
    _say(f"GNN: {stats['gnn'].get('val_best', {})}")

    aligner = None
    query_px = int(meta.get("img_size") or exp.data.img_size)
    if rc.fine_align and rc.align_from:
        aligner, stats["align"] = aligner_from(rc.align_from, query_px)
        _say(f"fine alignment: descriptor taken from {rc.align_from}")
    elif rc.fine_align and rc.align_steps > 0:
        # the aligner sees queries as the Localizer gets them: at the embedder's input size
        data = load_align_data(exp.data.root, "train", query_px=query_px, seed=rc.seed, progress=True)
        aligner, stats["align"] = train_aligner(
            data,
            int(data.queries.shape[1]),
            int(data.map_image.shape[0]),
            steps=rc.align_steps,
            batch_size=rc.align_batch_size,
            lr=rc.align_lr,
            dim=rc.align_dim,
            width=rc.align_width,
            crop_px=rc.align_crop_px,
            shift_px=rc.align_shift_px,
            eval_shift_px=rc.fine_max_shift_px if rc.fine_max_shift_px is not None else data.query_px // 2,
            seed=rc.seed,
            log_path=log_path,
        )
        stats["align"]["query_px"] = query_px
        _say(f"fine alignment: validation {stats['align'].get('val_after')}")
    if aligner is not None and len(val_idx):
        stats["align_min_peak"], stats["calibration"] = _calibrate(exp, gnn, aligner, gs, val_idx, anns, index, meta)
        _say(f"alignment peak threshold {stats['align_min_peak']:.3f}: {stats['calibration']}")
    stats["seconds"] = round(time.perf_counter() - t_start, 1)
    inputs = _inputs(ckpt, meta, index, rc.align_from if aligner is not None and rc.align_from else None)
    payload = refiner_payload(gnn, aligner, rc, k, int(gs.q.shape[1]), stats, inputs=inputs, experiment=exp.to_dict())
    path = save_refiner(run_dir / REFINER_FILE, payload)
    append_jsonl(log_path, {"stage": "done", "path": str(path), "seconds": stats["seconds"]})
    _say(f"saved {path} ({stats['seconds']:.0f} s)")
    return path


def _already_trained(exp: Experiment, ckpt_hash: str, index_dir: str | Path) -> Path | None:
    """``runs/<name>/refiner.pt`` when it was trained with this ``refine`` section on this
    ``data.root`` from these inputs: the embedder checkpoint of SHA-256 ``ckpt_hash``, the
    training index in ``index_dir`` (its manifest) and the ``refine.align_from`` refiner
    (SHA-256s as recorded in its ``inputs``); None when there is none, it is unreadable, or
    anything differs."""
    from cmpc.index.store import MANIFEST_FILE

    path = exp.run_dir / REFINER_FILE
    if not path.is_file():
        return None
    try:
        ck = load_checkpoint(path)
    except CheckpointError:
        return None  # unreadable: train a new one in its place
    old, new = ck.get("experiment") or {}, exp.to_dict()
    if ck.get("kind") != "refiner" or old.get("refine") != new["refine"] or (old.get("data") or {}).get("root") != new["data"]["root"]:
        return None
    embedder = refiner_embedder_record(ck)
    if embedder is None or embedder.get("sha256") != ckpt_hash:
        return None
    for role, file in (("index", Path(index_dir) / MANIFEST_FILE), ("align_from", exp.refine.align_from)):
        rec = provenance.recorded(ck, role)
        if rec is not None and not (file is not None and Path(file).is_file() and rec.get("sha256") == file_sha256(file)):
            return None
    return path


def _inputs(ckpt: Path, meta: dict[str, Any], index, align_from: str | None) -> dict[str, Any]:  # noqa: ANN001 - ReferenceIndex
    """The refiner's provenance record: the embedder checkpoint, the training index (its
    manifest) and the refiner its aligner was taken from (see :mod:`cmpc.utils.provenance`)."""
    from cmpc.index.store import MANIFEST_FILE

    out: dict[str, Any] = {"embedder": provenance.record(ckpt, meta["hash"])}
    manifest = Path(index.directory) / MANIFEST_FILE
    if manifest.is_file():
        out["index"] = provenance.record(manifest)
    if align_from:
        out["align_from"] = provenance.record(align_from)
    return out


def aligner_from(path: str | Path, query_px: int) -> tuple[DenseDescriptor, dict[str, Any]]:
    """The fine-alignment descriptor of another refiner checkpoint (it depends on the data,
    not on the embedder, so a new embedder need not retrain it); it must have been trained
    for queries of ``query_px`` pixels."""
    from cmpc.errors import CheckpointError
    from cmpc.models.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    if ck.get("kind") != "refiner" or ck.get("aligner") is None:
        raise CheckpointError(f"refine.align_from: {path} is not a refiner checkpoint with a fine-alignment descriptor")
    st = dict(ck.get("stats", {}).get("align") or {})
    got = st.get("query_px")
    if got is not None and int(got) != query_px:
        raise CheckpointError(f"refine.align_from: {path} aligns {got}-pixel queries but this embedder takes {query_px}-pixel ones; train a new aligner (unset refine.align_from)")
    a = ck["aligner_arch"]
    model = DenseDescriptor(int(a["sar_channels"]), int(a["optical_channels"]), int(a["dim"]), int(a["width"]))
    try:
        model.load_state_dict(ck["aligner"])
    except RuntimeError as e:
        raise CheckpointError(f"refine.align_from: {path}: aligner weights do not fit their architecture: {str(e).splitlines()[0]}") from None
    st["from"] = str(path)
    return model.eval(), st


def _calibrate(exp: Experiment, gnn, aligner, gs: GraphSet, val_idx: np.ndarray, anns: list, index, meta: dict) -> tuple[float, dict[str, Any]]:  # noqa: ANN001
    """Run the whole refiner on held-out training queries (the places the embedder did not
    train on: the refiner never trained on them either); for every fallback policy
    (:data:`cmpc.localize.refine.POLICIES`) choose its ``align_min_peak``, and choose the
    policy with the lowest capped mean error among those whose final R@1 is not below the
    coarse R@1. Returns (the threshold of the configured rerank / gnn_position, summary with
    ``policy`` (the chosen one) and ``policies``: per policy threshold, errors, R@1)."""
    from cmpc.localize.refine import POLICIES, policy_name

    img_size = int(meta.get("img_size") or exp.data.img_size)
    ds = PatchDataset(exp.data.root, "train", "sar", img_size, annotations=[anns[i] for i in val_idx])
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    q, rows, scores = gs.q[val_idx].numpy(), gs.rows[val_idx], gs.scores[val_idx]
    true = gs.true_pos[val_idx]
    target = gs.target[val_idx].numpy()
    correct = np.where(target >= 0, rows[np.arange(len(rows)), np.maximum(target, 0)], -1)
    coarse_r1 = float(np.mean(rows[:, 0] == correct))
    policies: dict[str, dict[str, Any]] = {}
    for name, (rerank, gnn_position) in POLICIES.items():
        if gnn is None and (rerank or gnn_position):
            continue
        cfg = dataclasses.replace(copy.deepcopy(exp.refine), rerank=rerank, gnn_position=gnn_position, fine_align=False)
        gr = GraphRefiner(gnn, aligner, cfg, cfg.k, int(gs.q.shape[1]), align_min_peak=-1.0)
        _, p_fb = gr.refine(q, rows, scores, index, x)
        cfg.fine_align = True
        _, p_al = gr.refine(q, rows, scores, index, x)
        peaks = gr.last_peaks
        e_fb, e_al = np.linalg.norm(p_fb - true, axis=1), np.linalg.norm(p_al - true, axis=1)
        t, summary = calibrate_min_peak(e_al, peaks, e_fb)
        gr.align_min_peak = t
        final_rows, _ = gr.refine(q, rows, scores, index, x)
        summary.update({"align_min_peak": t, "r1": float(np.mean(final_rows[:, 0] == correct)), "fallback_median_m": float(np.median(e_fb)), "aligned_median_m": float(np.median(e_al))})
        policies[name] = summary
    allowed = {k: v for k, v in policies.items() if v["r1"] >= coarse_r1 - 1e-12}
    chosen = min(allowed, key=lambda k: allowed[k]["capped_mean_m"])  # "coarse" is always allowed
    configured = policy_name(exp.refine.rerank, exp.refine.gnn_position)
    summary = {**policies.get(configured, policies[chosen]), "n": int(len(val_idx)), "coarse_r1": coarse_r1, "policy": chosen, "policies": policies}
    return float(summary["align_min_peak"]), summary  # the threshold of the configured switches (refine.gate=config)
