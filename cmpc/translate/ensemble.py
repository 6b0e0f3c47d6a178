"""Score-fusion ensemble of embedders (``cmpc translate ensemble``).

Embedders trained with different translators (or none) see a query differently; their
cosine scores are fused per reference as ``s(q, r) = sum_k w_k <q_k, r_k>``. That is exactly
the inner product of the weighted concatenation ``[w_1 q_1, ..., w_K q_K]`` with
``[r_1, ..., r_K]``, so the fused ranking is an ordinary search over concatenated features:
exact ranks come from :func:`cmpc.evaluate.metrics.exact_ranks` (references streamed in
chunks, never a queries x references matrix), the top-1 from a FAISS inner-product index.

Weights (w_k >= 0, summing to 1) are tuned with Optuna (TPE, seeded) to maximise R@1 (plus
a 1e-3 x mAP tie-breaker) on the validation split of the training area: the same spatial
hold-out the embedder trainer uses (:func:`cmpc.data.pairs.spatial_holdout` with
``train.val_fraction``), aligned queries against validation references. Equal weights and
each single member are tried first, so on validation the ensemble is never worse than its
best member. Test metrics (metrics.json block format) are then reported for every member
and for the ensemble. Writes ``<report_dir>/translate_ensemble.{json,md}``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cmpc.config import Experiment
from cmpc.data.layout import Annotation, ids, positions, read_annotations
from cmpc.data.patches import PatchDataset
from cmpc.errors import ConfigError
from cmpc.evaluate.metrics import block_metrics, exact_ranks, mean_average_precision, recall_at_k
from cmpc.models.checkpoint import embed_batches, load_embedder
from cmpc.utils.io import atomic_write_json, atomic_write_text
from cmpc.utils.runtime import resolve_device


@dataclass
class Member:
    """One embedder of the ensemble."""

    name: str
    path: Path
    model: torch.nn.Module
    img_size: int
    hash: str


def load_members(paths: list[str | Path], device: torch.device) -> list[Member]:
    """Load embedder checkpoints; names are their run folders (made unique)."""
    out: list[Member] = []
    seen: dict[str, int] = {}
    for p in paths:
        model, meta = load_embedder(p, device)
        name = Path(p).parent.name or Path(p).stem
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        out.append(Member(name, Path(p), model, int(meta["img_size"]), meta["hash"]))
    chans = {(m.model.sar_channels, m.model.optical_channels) for m in out}
    if len(chans) > 1:
        raise ConfigError(f"ensemble members were trained for different band counts {sorted(chans)}; fuse models of one dataset")
    return out


@torch.no_grad()
def embed(members: list[Member], root: str, split: str, mode: str, anns: list[Annotation], device: torch.device, batch: int = 64) -> list[np.ndarray]:
    """Per member, (len(anns), D_k) float32 embeddings of ``anns`` (modality ``mode``)."""
    out = []
    for m in members:
        ds = PatchDataset(root, split, mode, m.img_size, annotations=anns)
        feats = np.zeros((len(anns), m.model.embed_dim), np.float32)
        for e, idx in embed_batches(m.model, DataLoader(ds, batch_size=batch, num_workers=0), mode, device):
            feats[idx] = e
        out.append(feats)
    return out


def fuse(features: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted concatenation (N, sum D_k): put weights on the query side only."""
    w = np.ones(len(features)) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.ascontiguousarray(np.concatenate([float(wk) * f for wk, f in zip(w, features)], axis=1), dtype=np.float32)


def fused_ranks(q: list[np.ndarray], q_ids: np.ndarray, r: list[np.ndarray], r_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(Q,) exact 1-based rank of the correct reference under the fused score."""
    return exact_ranks(fuse(q, weights), q_ids, fuse(r), r_ids)


def fused_top1(q: list[np.ndarray], r: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """(Q,) row of the best reference under the fused score (FAISS exact inner product)."""
    import faiss

    refs = fuse(r)
    index = faiss.IndexFlatIP(refs.shape[1])
    index.add(refs)
    _, rows = index.search(fuse(q, weights), 1)
    return rows[:, 0].astype(np.int64)


def _objective_value(ranks: np.ndarray) -> float:
    r1 = recall_at_k(ranks, [1])["1"] or 0.0
    return float(r1 + 1e-3 * (mean_average_precision(ranks) or 0.0))


def tune_weights(
    q: list[np.ndarray], q_ids: np.ndarray, r: list[np.ndarray], r_ids: np.ndarray, trials: int, seed: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Optuna search of fusion weights on validation embeddings; returns (weights, summary)."""
    import optuna

    k = len(q)
    if k == 1:
        return np.ones(1), {"trials": 0, "best_value": _objective_value(fused_ranks(q, q_ids, r, r_ids, np.ones(1)))}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({f"w{i}": 1.0 for i in range(k)})
    for j in range(k):
        study.enqueue_trial({f"w{i}": (1.0 if i == j else 0.0) for i in range(k)})

    def weights_of(params: dict[str, float]) -> np.ndarray:
        w = np.array([params[f"w{i}"] for i in range(k)], dtype=np.float64)
        return w / w.sum() if w.sum() > 0 else np.full(k, 1.0 / k)

    def objective(trial: optuna.Trial) -> float:
        w = weights_of({f"w{i}": trial.suggest_float(f"w{i}", 0.0, 1.0) for i in range(k)})
        return _objective_value(fused_ranks(q, q_ids, r, r_ids, w))

    study.optimize(objective, n_trials=max(trials, k + 1), show_progress_bar=False)
    best = weights_of(study.best_params)
    return best, {"trials": len(study.trials), "best_value": float(study.best_value)}


def validation_split(exp: Experiment, refs: list[Annotation], queries: list[Annotation]) -> tuple[list[int], list[int]]:
    """(validation reference indices, their aligned query indices): the trainer's spatial hold-out."""
    from cmpc.data.pairs import footprint_side_m, queries_by_location, spatial_holdout

    split = spatial_holdout(positions(refs), exp.train.val_fraction, footprint_side_m(refs))
    if len(split.val) == 0:
        raise ConfigError("the ensemble needs a validation split to tune its weights: set train.val_fraction > 0")
    aligned_of = queries_by_location(refs, queries, non_aligned=False)
    return [int(i) for i in split.val], sorted(q for i in split.val for q in aligned_of[int(i)])


def _query_sets(queries: list[Annotation], names: list[str]) -> dict[str, list[int]]:
    sets = {
        "aligned": [i for i, a in enumerate(queries) if a.aligned is not False],
        "non_aligned": [i for i, a in enumerate(queries) if a.aligned is False],
    }
    return {n: sets[n] for n in names if n in sets and sets[n]}


def run_ensemble(exp: Experiment, members: list[str] | None = None, trials: int | None = None, references: list[str] | None = None) -> dict[str, Any]:
    """Tune fusion weights on validation, evaluate members and ensemble on the test split.

    ``references``: more embedder checkpoints evaluated alone beside the members (e.g. the
    run without translated views), not fused.
    """
    paths = list(members or exp.translate.ensemble)
    if len(paths) < 1:
        raise ConfigError("no ensemble members: list embedder checkpoints in translate.ensemble (or --members)")
    trials = int(trials or exp.translate.ensemble_trials)
    device = resolve_device(exp.train.device)
    t0 = time.perf_counter()
    ms = load_members(paths + list(references or []), device)
    n_fused = len(paths)
    root = exp.data.root

    # ---- validation: tune weights
    refs = read_annotations(root, "train", "opt")
    queries = read_annotations(root, "train", "sar")
    v_refs, v_q = validation_split(exp, refs, queries)
    vr = [refs[i] for i in v_refs]
    vq = [queries[i] for i in v_q]
    r_feat = embed(ms, root, "train", "opt", vr, device)
    q_feat = embed(ms, root, "train", "sar", vq, device)
    weights, summary = tune_weights(q_feat[:n_fused], ids(vq), r_feat[:n_fused], ids(vr), trials, seed=exp.train.seed)
    weights = np.concatenate([weights, np.zeros(len(ms) - n_fused)])  # references are never fused
    val: dict[str, Any] = {}
    for k, m in enumerate(ms):
        onehot = np.eye(len(ms))[k]
        rk = fused_ranks(q_feat, ids(vq), r_feat, ids(vr), onehot)
        val[m.name] = {"recall": recall_at_k(rk, [1, 5]), "mAP": mean_average_precision(rk)}
    rk = fused_ranks(q_feat, ids(vq), r_feat, ids(vr), weights)
    val["ensemble"] = {"recall": recall_at_k(rk, [1, 5]), "mAP": mean_average_precision(rk)}
    print(f"[ensemble] weights {dict(zip([m.name for m in ms], np.round(weights, 3)))}; val R@1 {val['ensemble']['recall']['1']:.3f}", file=sys.stderr, flush=True)

    # ---- test: every member alone, then the ensemble
    t_refs = read_annotations(root, "test", "opt")
    t_q = read_annotations(root, "test", "sar")
    tr_feat = embed(ms, root, "test", "opt", t_refs, device)
    tq_feat = embed(ms, root, "test", "sar", t_q, device)
    r_ids, r_pos = ids(t_refs), positions(t_refs)
    ks, thr = exp.eval.ks, exp.eval.thresholds_m
    systems = [(m.name, np.eye(len(ms))[k]) for k, m in enumerate(ms)] + [("ensemble", weights)]
    test: dict[str, Any] = {}
    for name, w in systems:
        block: dict[str, Any] = {}
        for qset, sel in _query_sets(t_q, exp.eval.query_sets).items():
            qf = [f[sel] for f in tq_feat]
            q_ids = ids([t_q[i] for i in sel])
            ranks = fused_ranks(qf, q_ids, tr_feat, r_ids, w)
            top = fused_top1(qf, tr_feat, w)
            err = np.linalg.norm(r_pos[top] - positions([t_q[i] for i in sel]), axis=1)
            m = block_metrics(ranks, err, ks, thr, cmc_max_k=max(ks))
            m.pop("error_cdf", None)
            block[qset] = {"n_queries": len(sel), "coarse": m}
        test[name] = block
    result = {
        "meta": {
            "dataset": root,
            "split": "test",
            "members": [{"name": m.name, "checkpoint": str(m.path), "hash": m.hash[:16]} for m in ms[:n_fused]],
            "references": [{"name": m.name, "checkpoint": str(m.path), "hash": m.hash[:16]} for m in ms[n_fused:]],
            "weights": {m.name: float(w) for m, w in zip(ms[:n_fused], weights)},
            "optuna": summary,
            "validation": {"references": len(vr), "queries": len(vq), "val_fraction": exp.train.val_fraction},
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "val": val,
        "test": test,
    }
    out = exp.report_dir
    atomic_write_json(out / "translate_ensemble.json", result)
    atomic_write_text(out / "translate_ensemble.md", format_table(result))
    return result


def _f(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown: weights, then per system and query set R@1/5/10, mAP, median error, within 25 m."""
    m = result["meta"]
    lines = [
        f"Dataset {m['dataset']} (test split); weights tuned by Optuna ({m['optuna']['trials']} trials) on "
        f"{m['validation']['queries']} validation queries vs {m['validation']['references']} validation references.",
        "",
        "| system | weight | val R@1 | query set | n | R@1 | R@5 | R@10 | mAP | median err (m) | within 25 m |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, block in result["test"].items():
        w = m["weights"].get(name)
        for qset, b in block.items():
            c = b["coarse"]
            lines.append(
                f"| {name} | {_f(w, 2) if w is not None else ('tuned' if name == 'ensemble' else 'not fused')} | {_f(result['val'][name]['recall']['1'])} | {qset} | {b['n_queries']} | "
                f"{_f(c['recall'].get('1'))} | {_f(c['recall'].get('5'))} | {_f(c['recall'].get('10'))} | {_f(c['mAP'])} | "
                f"{_f(c['error_m']['median'], 1)} | {_f(c['error_m']['within'].get('25'))} |"
            )
    lines.append("")
    return "\n".join(lines)
