"""Screen test-time augmentation on the validation block (never the test split).

    .venv/bin/python experiments/sentinel/screen_tta.py runs/sentinel/emb_best.pt [--root data/sentinel-la/dataset]

Embeds the validation queries (aligned and non-aligned) and references of the embedder's
validation hold-out (``cmpc.data.pairs.validation_holdout``: the tiler's validation boxes)
once per transform and compares retrieval when the embeddings of several transforms are
averaged (both modalities get the same transforms): none, horizontal flip, the four quarter
turns, and all eight dihedral transforms. Prints one JSON object (R@1 / R@5 / R@10 per
variant and query set). The lever is kept only if it wins here.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from cmpc.data.layout import read_annotations, read_dataset_meta
from cmpc.data.pairs import validation_holdout
from cmpc.data.patches import PatchDataset
from cmpc.models.checkpoint import load_embedder


def _t(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if flip else x


@torch.no_grad()
def embed(model, ds: PatchDataset, idx: np.ndarray, modality: str, k: int, flip: bool) -> torch.Tensor:  # noqa: ANN001
    out = []
    for s in range(0, len(idx), 128):
        x = torch.stack([ds.load(int(i)) for i in idx[s : s + 128]])
        out.append(model(_t(x, k, flip), modality).float())
    return torch.cat(out)


def recalls(q: torch.Tensor, qid: np.ndarray, r: torch.Tensor, rid: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    q, r = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(r, dim=1)
    top = (q @ r.T).topk(max(ks), dim=1).indices.numpy()
    hit = rid[top] == qid[:, None]
    return {str(k): round(float(hit[:, :k].any(1).mean()), 4) for k in ks}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--root", default="data/sentinel-la/dataset")
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, meta = load_embedder(a.checkpoint)
    size = int(meta["img_size"])
    refs, queries = read_annotations(a.root, "train", "opt"), read_annotations(a.root, "train", "sar")
    split = validation_holdout(read_dataset_meta(a.root), refs, 0.1)
    val_ids = {refs[int(i)].id for i in split.val}
    r_idx = np.asarray(split.val, dtype=np.int64)
    opt = PatchDataset(a.root, "train", "opt", size, annotations=refs)
    sar = PatchDataset(a.root, "train", "sar", size, annotations=queries)
    rid = np.array([refs[int(i)].id for i in r_idx])
    sets = {
        "aligned": np.array([i for i, q in enumerate(queries) if q.id in val_ids and q.aligned is not False]),
        "non_aligned": np.array([i for i, q in enumerate(queries) if q.id in val_ids and q.aligned is False]),
    }
    transforms = [(k, f) for f in (False, True) for k in range(4)]
    R = {t: embed(model, opt, r_idx, "opt", *t) for t in transforms}
    Q = {name: {t: embed(model, sar, idx, "sar", *t) for t in transforms} for name, idx in sets.items()}
    variants = {"none": [(0, False)], "hflip": [(0, False), (0, True)], "rot4": [(k, False) for k in range(4)], "d4": transforms}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for v, ts in variants.items():
        r = torch.stack([torch.nn.functional.normalize(R[t], dim=1) for t in ts]).mean(0)
        out[v] = {}
        for name, idx in sets.items():
            q = torch.stack([torch.nn.functional.normalize(Q[name][t], dim=1) for t in ts]).mean(0)
            qid = np.array([queries[int(i)].id for i in idx])
            out[v][name] = recalls(q, qid, r, rid)
    print(json.dumps({"checkpoint": a.checkpoint, "sha256": meta["hash"], "n_refs": len(r_idx), "n_queries": {k: len(v) for k, v in sets.items()}, "recall": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
