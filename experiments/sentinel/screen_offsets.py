"""Screen an offset search with the global embedder for non-aligned queries (validation block only).

A non-aligned query lies anywhere between the reference grid's centres (stride 64 px), and
the embedder ranks it far worse than an aligned one (shipped model, test blocks: coarse R@1
0.32 non-aligned against 0.90 aligned). This asks whether the embedder itself can finish the
job: around each of a query's coarse top-K references, optical windows are cut from the map at
offsets of the grid (stage 1: every ``step1`` px within +-32 px, covering the gap between
references), embedded, and the best-scoring window over all candidates is refined by a finer
offset grid around it (stage 2: every ``step2`` px within +-``step1`` px). The answer is the
best window's centre. Prints within 25 / 100 / 640 m for the coarse top-1 centre and both
stages, over the validation block's non-aligned queries (``cmpc.data.pairs.validation_holdout``:
never the test split).

    .venv/bin/python experiments/sentinel/screen_offsets.py weights/sentinel/embedder.pt --top 5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cmpc.data.layout import read_annotations, read_dataset_meta
from cmpc.data.mosaic import open_maps
from cmpc.data.pairs import validation_holdout
from cmpc.data.patches import PatchDataset, to_model_input
from cmpc.models.checkpoint import load_embedder


@torch.no_grad()
def embed(model, xs: list[torch.Tensor], modality: str, bs: int = 128) -> torch.Tensor:  # noqa: ANN001
    out = [model(torch.stack(xs[s : s + bs]), modality).float() for s in range(0, len(xs), bs)]
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def validation_block(root: str) -> tuple[dict, list, list, np.ndarray, list[int]]:
    """The validation block of a tiled dataset's train split (``validation_holdout``: never the
    test split): (dataset meta, references, queries, reference rows, query rows of its places)."""
    dmeta = read_dataset_meta(root)
    refs, queries = read_annotations(root, "train", "opt"), read_annotations(root, "train", "sar")
    r_idx = np.asarray(validation_holdout(dmeta, refs, 0.1).val, dtype=np.int64)
    val_ids = {refs[int(i)].id for i in r_idx}
    return dmeta, refs, queries, r_idx, [i for i, q in enumerate(queries) if q.id in val_ids]


def windows(region: np.ndarray, centre_rc: tuple[int, int], offsets: list[tuple[int, int]], p: int, size: int) -> list[torch.Tensor]:
    """p x p windows of ``region`` (C, H, W) centred at centre + offset (row, col px)."""
    out = []
    for dr, dc in offsets:
        r0, c0 = centre_rc[0] + dr - p // 2, centre_rc[1] + dc - p // 2
        w = np.nan_to_num(region[:, r0 : r0 + p, c0 : c0 + p], nan=0.0)
        out.append(to_model_input(w, size))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--root", default="data/sentinel-la/dataset")
    ap.add_argument("--pairs", default="../shared/data/real/sentinel-la")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--step1", type=int, default=16)
    ap.add_argument("--step2", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="first N queries only (0 = all)")
    a = ap.parse_args()
    t0 = time.time()
    model, meta = load_embedder(a.checkpoint)
    size = int(meta["img_size"])
    dmeta, refs, queries, r_idx, val_q = validation_block(a.root)
    p, gsd = int(dmeta["patch_px"]), float(dmeta["gsd_m"])
    q_idx = np.array([i for i in val_q if queries[i].aligned is False])
    if a.limit:
        q_idx = q_idx[: a.limit]
    opt = PatchDataset(a.root, "train", "opt", size, annotations=refs)
    sar = PatchDataset(a.root, "train", "sar", size, annotations=queries)
    R = embed(model, [opt.load(int(i)) for i in r_idx], "opt")
    Q = embed(model, [sar.load(int(i)) for i in q_idx], "sar")
    rxy = np.array([[refs[int(i)].x, refs[int(i)].y] for i in r_idx])
    qxy = np.array([[queries[int(i)].x, queries[int(i)].y] for i in q_idx])
    top = (Q @ R.T).topk(a.top, dim=1).indices.numpy()
    m = 32 + a.step1 + p // 2  # region half-side around a candidate, px
    off1 = [(dr, dc) for dr in range(-32, 33, a.step1) for dc in range(-32, 33, a.step1)]
    off2 = [(dr, dc) for dr in range(-a.step1, a.step1 + 1, a.step2) for dc in range(-a.step1, a.step1 + 1, a.step2)]
    ans1, ans2, best_s = [], [], []
    maps = open_maps(a.pairs, "optical")
    for qi in range(len(q_idx)):
        best = (-2.0, None, None, None)
        regions = []
        for k in range(a.top):
            cx, cy = rxy[top[qi, k]]
            reg, _ = maps.read_bounds((cx - m * gsd, cy - m * gsd, cx + m * gsd, cy + m * gsd), (2 * m, 2 * m))
            regions.append((reg, cx, cy))
            s = (embed(model, windows(reg, (m, m), off1, p, size), "opt") @ Q[qi]).numpy()
            j = int(s.argmax())
            if s[j] > best[0]:
                best = (float(s[j]), k, off1[j], None)
        _, k, (dr, dc), _ = best
        reg, cx, cy = regions[k]
        ans1.append((cx + dc * gsd, cy - dr * gsd))
        s2 = (embed(model, windows(reg, (m + dr, m + dc), off2, p, size), "opt") @ Q[qi]).numpy()
        j = int(s2.argmax())
        ans2.append((cx + (dc + off2[j][1]) * gsd, cy - (dr + off2[j][0]) * gsd))
        best_s.append(float(s2[j]))
        if qi % 50 == 0:
            print(f"{qi}/{len(q_idx)} {time.time() - t0:.0f} s", flush=True)
    maps.close()

    def within(xy: np.ndarray) -> dict[str, float]:
        e = np.linalg.norm(np.asarray(xy) - qxy, axis=1)
        return {"within_25m": round(float((e <= 25).mean()), 3), "within_100m": round(float((e <= 100).mean()), 3),
                "within_640m": round(float((e <= 640).mean()), 3), "median_m": round(float(np.median(e)), 1)}

    out = {"checkpoint": a.checkpoint, "n_refs": len(r_idx), "n_queries": len(q_idx), "top": a.top, "step1": a.step1, "step2": a.step2,
           "coarse_top1": within(rxy[top[:, 0]]), "stage1": within(np.array(ans1)), "stage2": within(np.array(ans2)),
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
