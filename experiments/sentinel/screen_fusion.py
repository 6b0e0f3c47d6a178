"""Screen score fusion of the three sentinel-la seeds on the validation block (never the test split).

    .venv/bin/python experiments/sentinel/screen_fusion.py runs/sentinel/emb_best.pt runs/sentinel_s1/emb_best.pt runs/sentinel_s2/emb_best.pt

Embeds the validation block (``cmpc.data.pairs.validation_holdout``: the tiler's validation
boxes) with every checkpoint, then ranks by the fused cosine score
``s(q, r) = sum_k <q_k, r_k> / K`` (equal weights: with three members and 420 references there
is too little validation data to tune weights without fitting noise) for every subset of the
members. Prints one JSON object with R@1 / R@5 / R@10 per subset and query set (aligned and
non-aligned). The fused model is shipped only if it wins here.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from cmpc.data.layout import read_annotations, read_dataset_meta
from cmpc.data.pairs import validation_holdout
from cmpc.data.patches import PatchDataset
from cmpc.models.checkpoint import load_embedder


@torch.no_grad()
def embed(model, ds: PatchDataset, idx: np.ndarray, modality: str) -> torch.Tensor:  # noqa: ANN001
    out = []
    for s in range(0, len(idx), 128):
        x = torch.stack([ds.load(int(i)) for i in idx[s : s + 128]])
        out.append(torch.nn.functional.normalize(model(x, modality).float(), dim=1))
    return torch.cat(out)


def recalls(q: torch.Tensor, qid: np.ndarray, r: torch.Tensor, rid: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    top = (q @ r.T).topk(max(ks), dim=1).indices.numpy()
    hit = rid[top] == qid[:, None]
    return {str(k): round(float(hit[:, :k].any(1).mean()), 4) for k in ks}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--root", default="data/sentinel-la/dataset")
    a = ap.parse_args()
    torch.set_num_threads(2)
    refs, queries = read_annotations(a.root, "train", "opt"), read_annotations(a.root, "train", "sar")
    split = validation_holdout(read_dataset_meta(a.root), refs, 0.1)
    val_ids = {refs[int(i)].id for i in split.val}
    r_idx = np.asarray(split.val, dtype=np.int64)
    rid = np.array([refs[int(i)].id for i in r_idx])
    sets = {
        "aligned": np.array([i for i, q in enumerate(queries) if q.id in val_ids and q.aligned is not False]),
        "non_aligned": np.array([i for i, q in enumerate(queries) if q.id in val_ids and q.aligned is False]),
    }
    R, Q, hashes = [], [], []
    for path in a.checkpoints:
        model, meta = load_embedder(path)
        size = int(meta["img_size"])
        opt = PatchDataset(a.root, "train", "opt", size, annotations=refs)
        sar = PatchDataset(a.root, "train", "sar", size, annotations=queries)
        R.append(embed(model, opt, r_idx, "opt"))
        Q.append({name: embed(model, sar, idx, "sar") for name, idx in sets.items()})
        hashes.append(meta["hash"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n in range(1, len(R) + 1):
        for sub in itertools.combinations(range(len(R)), n):
            key = "+".join(str(i) for i in sub)
            r = torch.cat([R[i] for i in sub], dim=1)
            out[key] = {}
            for name, idx in sets.items():
                q = torch.cat([Q[i][name] for i in sub], dim=1)
                qid = np.array([queries[int(i)].id for i in idx])
                out[key][name] = recalls(q, qid, r, rid)
    print(json.dumps({"checkpoints": a.checkpoints, "sha256": hashes, "n_refs": len(r_idx), "n_queries": {k: len(v) for k, v in sets.items()}, "recall": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
