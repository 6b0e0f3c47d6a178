"""The scene-graph refiner: GNN shapes and gradients, position head, loss, bad input, end to end."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cmpc.config import RefineConfig
from cmpc.errors import CheckpointError, DataError, IndexMismatchError
from cmpc.localize.refine import GraphRefiner, refiner_from_checkpoint, refiner_payload, save_refiner
from cmpc.models.graph import build_graphs
from cmpc.models.refiner import RefinerOutput, SceneGraphRefiner, mix_positions, refiner_loss

D = 8


def _batch(B: int = 3, k: int = 5, seed: int = 0, n_valid: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(B, k, D, generator=g), dim=2)
    pos = torch.randint(0, 6, (B, k, 2), generator=g).double() * 32.0 + 400_000.0
    sim = (q[:, None] * c).sum(-1)
    valid = torch.ones(B, k, dtype=torch.bool)
    for b, n in enumerate(n_valid or []):
        valid[b, n:] = False
    return build_graphs(q, c, pos, sim, 32.0, 2, 2, valid)


def test_forward_backward_shapes_and_gradients():
    torch.manual_seed(0)
    model = SceneGraphRefiner(D, hidden=16, layers=2, heads=2)
    graphs = _batch(n_valid=[5, 3, 1])
    out = model(graphs)
    assert out.scores.shape == (3, 5) and out.weights.shape == (3, 5) and out.position.shape == (3, 2)
    # padded slots: -inf score, zero weight; weights of each graph sum to 1
    assert torch.isinf(out.scores[1, 3:]).all() and torch.isfinite(out.scores[1, :3]).all()
    assert (out.weights[2, 1:] == 0).all() and out.weights[2, 0].item() == pytest.approx(1.0)
    assert out.weights.sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0])
    # a graph of one node: the mix is its own (zero) relative position
    assert out.mix[2].tolist() == pytest.approx([0.0, 0.0])
    loss, parts = refiner_loss(out, torch.tensor([2, 0, -1]), torch.randn(3, 2), 0.2, 1.0)
    loss.backward()
    assert parts["n_ce"] == 2
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # every block (attention and FFN) and every head receives signal
    for name in ("blocks.0.conv.lin_l.weight", "blocks.1.ffn.0.weight", "score_head.2.weight", "weight_head.2.weight", "offset_head.2.weight", "sim_gain"):
        assert grads[name].abs().sum() > 0, name


def test_untrained_refiner_keeps_the_coarse_order():
    model = SceneGraphRefiner(D, hidden=16, layers=2, heads=2)
    graphs = _batch()
    out = model(graphs)
    sim = graphs.batch.x[:, 3 * D].reshape(3, 5)
    assert torch.equal(out.scores.argsort(1, descending=True), sim.argsort(1, descending=True))
    assert torch.allclose(out.offset, torch.zeros(3, 2))


def test_position_head_is_a_softmax_weighted_mix():
    # hand-set logits: softmax([0, ln 3]) = [0.25, 0.75]; second graph: 3 equal logits
    logits = torch.tensor([0.0, math.log(3.0), 1.0, 1.0, 1.0])
    rel = torch.tensor([[0.0, 0.0], [4.0, -2.0], [0.0, 0.0], [3.0, 0.0], [0.0, 6.0]])
    batch = torch.tensor([0, 0, 1, 1, 1])
    mix, w = mix_positions(logits, rel, batch, 2)
    assert w.tolist() == pytest.approx([0.25, 0.75, 1 / 3, 1 / 3, 1 / 3])
    assert torch.allclose(mix, torch.tensor([[3.0, -1.5], [1.0, 2.0]]))
    # through the model: a constant weight head gives the mean of the candidate positions,
    # and position = mix + offset
    model = SceneGraphRefiner(D, hidden=16, layers=1, heads=2)
    torch.nn.init.zeros_(model.weight_head[-1].weight)
    graphs = _batch(n_valid=[5, 4, 2])
    out = model(graphs)
    rel_tab = torch.zeros(15, 2)
    rel_tab[graphs.slot] = graphs.batch.rel_pos
    rel_tab = rel_tab.view(3, 5, 2)
    want = torch.stack([rel_tab[b, :n].mean(0) for b, n in enumerate([5, 4, 2])])
    assert torch.allclose(out.mix, want, atol=1e-6)
    assert torch.allclose(out.position, out.mix + out.offset)


def test_loss_matches_hand_computation():
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]])
    out = RefinerOutput(scores, torch.zeros(1, 4), torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[0.5, 0.0]]))
    loss, parts = refiner_loss(out, torch.tensor([1]), torch.tensor([[0.0, 0.0]]), rank_margin=0.5, position_weight=2.0, huber_beta=0.1)
    ce = -(1.0 - math.log(math.exp(2) + math.exp(1) + math.exp(0)))
    # hinge: max(0, 0.5 - (1 - 2)) = 1.5 and max(0, 0.5 - (1 - 0)) = 0 over the 2 other valid slots
    rank = (1.5 + 0.0) / 2
    pos = 0.5 - 0.05  # Huber(0.5, beta 0.1) in x, 0 in y
    assert parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert parts["rank"] == pytest.approx(rank, rel=1e-5)
    assert parts["pos"] == pytest.approx(pos, rel=1e-5)
    assert float(loss) == pytest.approx(ce + rank + 2.0 * pos, rel=1e-5)
    # a query whose correct reference is not among the candidates trains the position only
    loss2, parts2 = refiner_loss(out, torch.tensor([-1]), torch.tensor([[0.0, 0.0]]), 0.5, 2.0, 0.1)
    assert parts2["n_ce"] == 0 and parts2["ce"] == 0 and float(loss2) == pytest.approx(2.0 * pos, rel=1e-5)
    # ... unless it is out of reach of every candidate: then it trains nothing
    loss3, parts3 = refiner_loss(out, torch.tensor([-1]), torch.tensor([[0.0, 0.0]]), 0.5, 2.0, 0.1, position_mask=torch.tensor([False]))
    assert parts3["pos"] == 0 and float(loss3) == 0.0


# --------------------------------------------------------------------------- bad input


class _Map:
    """The index attributes the refiner reads (rows, features, positions), for a 6 x 6 grid."""

    def __init__(self, dim: int = D, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        ys, xs = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
        self.positions = np.stack([xs.ravel() * 32.0, ys.ravel() * 32.0], 1) + 5e5
        self.features = torch.nn.functional.normalize(torch.randn(36, dim, generator=g), dim=1).numpy()
        self.directory = f"grid-{dim}-{seed}"
        self.manifest = {}
        self.bounds = np.concatenate([self.positions - 32, self.positions + 32], 1)

    def gather_features(self, rows: np.ndarray) -> np.ndarray:
        return self.features[rows]


def _refiner(k: int = 4) -> GraphRefiner:
    cfg = RefineConfig(k=k, hidden=16, layers=1, heads=2, spatial_knn=2, feature_knn=2)
    return GraphRefiner(SceneGraphRefiner(D, 16, 1, 2), None, cfg, k, D)


def _search(m: _Map, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ m.features.T
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(s, rows, 1).astype(np.float32)


def test_fewer_candidates_than_k_are_padded():
    m = _Map()
    ref = _refiner(k=4)
    q = m.features[[3, 10]] + 0.01
    rows, scores = _search(m, q, 2)  # a tight prior left only 2 candidates
    order, pos = ref.refine(q, rows, scores, m, None)
    assert order.shape == (2, 2) and sorted(order[0]) == sorted(rows[0])
    assert pos.shape == (2, 2) and np.isfinite(pos).all()
    # more candidates than k: the GNN reorders the first k, the rest keep their coarse order
    rows, scores = _search(m, q, 7)
    order, _ = ref.refine(q, rows, scores, m, None)
    assert order.shape == (2, 7) and np.array_equal(order[:, 4:], rows[:, 4:])
    assert all(sorted(order[b, :4]) == sorted(rows[b, :4]) for b in range(2))


def test_nan_and_wrong_dimension_are_clear_errors():
    m = _Map()
    ref = _refiner()
    q = m.features[[1, 2]].copy()
    rows, scores = _search(m, q, 4)
    q[1, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        ref.refine(q, rows, scores, m, None)
    m.features[rows[0, 1]] = np.nan
    with pytest.raises(DataError, match="NaN"):
        ref.refine(m.features[[5]] * 0 + 0.3, rows[:1], scores[:1], m, None)
    m16 = _Map(dim=16)
    q16 = m16.features[[0]]
    r16, s16 = _search(m16, q16, 4)
    with pytest.raises(IndexMismatchError, match="8-dimensional"):
        ref.refine(q16, r16, s16, m16, None)


def test_checkpoint_for_another_k_is_refused(tmp_path: Path):
    cfg = RefineConfig(k=4, hidden=16, layers=1, heads=2)
    path = save_refiner(tmp_path / "refiner.pt", refiner_payload(SceneGraphRefiner(D, 16, 1, 2), None, cfg, 4, D, {"n_queries": 0}))
    ok = refiner_from_checkpoint(path, cfg)
    assert ok.k == 4 and ok.embed_dim == D and ok.aligner is None
    with pytest.raises(CheckpointError, match="k=4.*refine.k is 6"):
        refiner_from_checkpoint(path, RefineConfig(k=6))
    torch.save({"kind": "embedder"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a refiner"):
        refiner_from_checkpoint(tmp_path / "other.pt", cfg)


def test_aligner_reused_from_another_refiner(tmp_path: Path):
    from cmpc.models.descriptor import DenseDescriptor
    from cmpc.train.refine import aligner_from

    cfg = RefineConfig(k=4, hidden=16, layers=1, heads=2)
    al = DenseDescriptor(1, 3, dim=8, width=16)
    with torch.no_grad():
        al.branches["sar"][0].weight.fill_(0.25)
    path = save_refiner(tmp_path / "r.pt", refiner_payload(SceneGraphRefiner(D, 16, 1, 2), al, cfg, 4, D, {"align": {"query_px": 32}}))
    got, st = aligner_from(path, 32)
    assert torch.equal(got.branches["sar"][0].weight, al.branches["sar"][0].weight) and st["from"] == str(path)
    with pytest.raises(CheckpointError, match="32-pixel queries.*64-pixel"):
        aligner_from(path, 64)
    bare = save_refiner(tmp_path / "b.pt", refiner_payload(SceneGraphRefiner(D, 16, 1, 2), None, cfg, 4, D, {}))
    with pytest.raises(CheckpointError, match="fine-alignment descriptor"):
        aligner_from(bare, 32)


def test_training_noise_matches_a_target_recall():
    from cmpc.train.refine import noise_for_recall, noisy, recall_at_1

    m = _Map(dim=32, seed=3)
    m.ids = np.arange(36)

    def search(q, k):
        s = q @ m.features.T
        rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, rows, 1), rows

    m.search = search
    q = np.repeat(m.features, 20, axis=0)  # 720 queries, perfect retrieval
    qid = np.repeat(m.ids, 20)
    assert recall_at_1(q, qid, m) == 1.0
    assert noisy(q, 0.0, 0) is q
    qn = noisy(q, 0.5, 0)
    assert np.allclose(np.linalg.norm(qn, axis=1), 1.0, atol=1e-5)
    assert 0.8 < float(np.mean(np.sum(qn * q, axis=1))) < 0.95  # noise norm 0.5 -> cos ~ 0.89
    sigma = noise_for_recall(q, qid, m, 0.6, seed=0)
    assert sigma > 0 and abs(recall_at_1(noisy(q, sigma, 0), qid, m) - 0.6) < 0.03
    assert noise_for_recall(q, qid, m, 1.0) == 0.0


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_end_to_end_refinement_lowers_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """train_refiner on a tiny world (SAR = optical pixels and an untrained embedder with tied
    stems: a weak but honest coarse stage), a real index, the Localizer with the refiner:
    the refined positions of non-aligned test queries are clearly better than the centres of
    the coarse top-1 references."""
    from index_fixtures import experiment, train_refiner_command, write_checkpoint, write_dataset

    from cmpc.data.patches import PatchDataset
    from cmpc.index.build import build_index
    from cmpc.localize.localizer import Localizer
    from cmpc.utils.io import read_jsonl

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "ds"
    write_dataset(root, split="train", seed=0, grid=6, patch_px=32, sar_equals_optical=True, non_aligned=60)
    write_dataset(root, split="test", seed=1, grid=5, patch_px=32, id_offset=1000, sar_equals_optical=True, non_aligned=30)
    exp = experiment(
        "e2e", root, "data.img_size=32", "train.threads=1",
        "refine.k=4", "refine.epochs=6", "refine.hidden=16", "refine.layers=1", "refine.heads=2", "refine.batch_size=32",
        "refine.align_steps=40", "refine.align_batch_size=8", "refine.align_crop_px=32", "refine.align_shift_px=8",
        "refine.align_width=16", "refine.align_dim=8",
    )
    write_checkpoint(exp.run_dir / "emb_best.pt", sar_channels=3, img_size=32, embed_dim=16, tie_stems=True)
    path = train_refiner_command(exp)
    assert path == exp.run_dir / "refiner.pt" and path.is_file()
    log = read_jsonl(exp.run_dir / "refine_log.jsonl")
    data = log[0]
    assert data["stage"] == "data" and data["n_queries"] == 96 and data["k"] == 4
    # queries whose correct reference is outside the top-k are counted, split by kind
    assert data["missing_in_topk"] == data["missing_in_topk_aligned"] + data["missing_in_topk_non_aligned"]
    assert 0 <= data["unreachable"] <= data["missing_in_topk"]
    assert [r["epoch"] for r in log if r["stage"] == "gnn"] == list(range(1, 7))
    assert any(r["stage"] == "align" for r in log) and log[-1]["stage"] == "done"

    build_index(exp)
    loc = Localizer.from_experiment(exp)
    assert loc.refiner is not None
    ds = PatchDataset(root, "test", "sar", 32)
    na = [i for i, a in enumerate(ds.annotations) if not a.aligned]
    res = loc.localize_batch(torch.stack([ds[i][0] for i in na]))
    true = np.array([[ds.annotations[i].x, ds.annotations[i].y] for i in na])
    coarse = np.linalg.norm(res.coarse_xy - true, axis=1)
    refined = np.linalg.norm(res.refined_xy - true, axis=1)
    assert np.median(refined) < 0.7 * np.median(coarse), (np.median(coarse), np.median(refined))
    assert np.mean(refined <= 2.0) >= np.mean(coarse <= 2.0) + 0.2
    # every refined order is a permutation of the coarse candidates
    assert all(sorted(a) == sorted(b) for a, b in zip(res.rows, res.refined_rows))
    # gating: each position says where it came from; a peak under the threshold keeps the fallback
    ref = loc.refiner
    took = res.align_peak >= ref.align_min_peak
    assert set(res.position_from) <= {"aligned", "gnn"} and np.array_equal(res.position_from == "aligned", took)
    ref.align_min_peak, ref.cfg.rerank, ref.cfg.gnn_position = 1.01, False, False  # nothing passes: coarse kept
    kept = loc.localize_batch(torch.stack([ds[i][0] for i in na]))
    assert set(kept.position_from) == {"coarse"} and np.array_equal(kept.refined_xy, kept.coarse_xy)
    assert np.array_equal(kept.refined_rows, kept.rows)

    # calibration on the held-out queries: every fallback policy gets its threshold and R@1;
    # the chosen one never has a lower R@1 than the coarse order and has the lowest capped error
    from cmpc.localize.refine import POLICIES, gated_settings
    from cmpc.models.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    cal = ck["stats"]["calibration"]
    assert set(cal["policies"]) == set(POLICIES)
    allowed = {k: v for k, v in cal["policies"].items() if v["r1"] >= cal["coarse_r1"]}
    assert cal["policy"] == min(allowed, key=lambda k: allowed[k]["capped_mean_m"])
    assert cal["policies"]["coarse"]["r1"] == cal["coarse_r1"]  # the coarse order is the coarse order
    assert ck["stats"]["align_min_peak"] == cal["policies"]["gnn_position"]["align_min_peak"]  # the configured switches
    cfg, t = gated_settings(ck, dataclasses.replace(exp.refine, gate="calibrated"), path)
    assert (cfg.rerank, cfg.gnn_position) == POLICIES[cal["policy"]] and t == cal["policies"][cal["policy"]]["align_min_peak"]
    cfg, t = gated_settings(ck, dataclasses.replace(exp.refine, rerank=False, gnn_position=False), path)
    assert (cfg.rerank, cfg.gnn_position) == (False, False) and t == cal["policies"]["coarse"]["align_min_peak"]
    old = {**ck, "stats": {k: v for k, v in ck["stats"].items() if k != "calibration"}}
    with pytest.raises(CheckpointError, match="no calibrated policy"):
        gated_settings(old, dataclasses.replace(exp.refine, gate="calibrated"), path)


@pytest.mark.slow
def test_a_finished_refiner_is_kept_and_other_settings_retrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A second training with the same refine settings and the same embedder (SHA-256)
    returns at once: refiner.pt and its log are untouched. A changed refine setting, or
    another embedder checkpoint at the same path, trains again."""
    from index_fixtures import experiment, train_refiner_command, write_checkpoint, write_dataset

    from cmpc.models.checkpoint import checkpoint_hash, load_checkpoint
    from cmpc.utils.io import read_jsonl

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "ds"
    write_dataset(root, split="train", seed=0, grid=5, patch_px=32, non_aligned=10)
    args = ("data.img_size=32", "train.threads=1", "refine.k=3", "refine.epochs=1", "refine.hidden=8", "refine.layers=1",
            "refine.heads=1", "refine.fine_align=false")
    exp = experiment("again", root, *args)
    emb = write_checkpoint(exp.run_dir / "emb_best.pt", img_size=32, embed_dim=8)
    path = train_refiner_command(exp)
    log = exp.run_dir / "refine_log.jsonl"
    first = (path.read_bytes(), path.stat().st_mtime_ns, log.read_text())

    assert train_refiner_command(experiment("again", root, *args)) == path
    assert (path.read_bytes(), path.stat().st_mtime_ns, log.read_text()) == first  # nothing trained, nothing written

    assert train_refiner_command(experiment("again", root, *args, "refine.epochs=2")) == path
    assert path.stat().st_mtime_ns != first[1]
    assert [r["epoch"] for r in read_jsonl(log) if r["stage"] == "gnn"] == [1, 2]
    assert load_checkpoint(path)["experiment"]["refine"]["epochs"] == 2
    second = path.stat().st_mtime_ns

    write_checkpoint(emb, img_size=32, embed_dim=8, seed=1)  # another embedder, same file name
    train_refiner_command(experiment("again", root, *args, "refine.epochs=2"))
    assert path.stat().st_mtime_ns != second
    assert load_checkpoint(path)["inputs"]["embedder"]["sha256"] == checkpoint_hash(emb)


def test_places_unseen_by_the_embedder_follow_the_validation_boxes(tmp_path: Path):
    """With tiler validation boxes in dataset.json, the refiner validates and calibrates on
    the queries inside them (where the embedder validated), not on the west end."""
    import json

    from index_fixtures import experiment, write_dataset

    from cmpc.data.layout import read_annotations
    from cmpc.train.refine import embedder_unseen

    root = tmp_path / "ds"
    write_dataset(root, split="train", seed=0, grid=6, patch_px=16, non_aligned=10)
    refs = read_annotations(root, "train", "opt")
    xs, ys = np.array([a.x for a in refs]), np.array([a.y for a in refs])
    box = [float(xs.max() - 20), float(ys.max() - 20), float(xs.max() + 8), float(ys.max() + 8)]  # the north-east corner
    meta_path = root / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta["areas"] = {"val": {"boxes": [box]}, "buffer_m": 0.0}
    meta_path.write_text(json.dumps(meta))
    anns = read_annotations(root, "train", "sar")
    unseen = embedder_unseen(experiment("u", root), {}, anns)
    inside = {a.id for a in refs if a.x - 8 >= box[0] and a.y - 8 >= box[1] and a.x + 8 <= box[2] and a.y + 8 <= box[3]}
    touching = {a.id for a in refs if a.x - 8 < box[2] and box[0] < a.x + 8 and a.y - 8 < box[3] and box[1] < a.y + 8}
    assert 0 < len(inside) < len(touching) < len(refs) / 2
    # validation (inside) and the references the trainer held back around it (touching the box)
    assert {a.id for a, u in zip(anns, unseen) if u} == touching


def test_an_aligner_alone_loads_beside_any_embedder(tmp_path: Path):
    """`cmpc model aligner`: the dense descriptor of a refiner without its GNN and gate; no
    embedder check (it never sees embeddings) and no embedding-width check at query time,
    while the full refiner keeps refusing another embedder."""
    from cmpc.cli import main
    from cmpc.localize.refine import aligner_payload
    from cmpc.models.descriptor import DenseDescriptor

    cfg = RefineConfig(k=4, hidden=16, layers=1, heads=2)
    al = DenseDescriptor(1, 3, dim=8, width=16)
    with torch.no_grad():
        al.branches["sar"][0].weight.fill_(0.5)
    emb = {"path": "emb.pt", "sha256": "1" * 64}
    full = save_refiner(tmp_path / "r.pt", refiner_payload(SceneGraphRefiner(D, 16, 1, 2), al, cfg, 4, D, {"align": {"query_px": 32}},
                                                           inputs={"embedder": emb}))
    other = {"path": "fused.pt", "sha256": "2" * 64}
    with pytest.raises(CheckpointError, match="embedder"):
        refiner_from_checkpoint(full, cfg, embedder=other)
    assert main(["model", "aligner", str(full), str(tmp_path / "a.pt")]) == 0
    ck = torch.load(tmp_path / "a.pt", weights_only=True)
    assert ck["gnn"] is None and ck["stats"]["align"] == {"query_px": 32} and ck["inputs"]["aligner_from"]["path"] == str(full)
    gr = refiner_from_checkpoint(tmp_path / "a.pt", dataclasses.replace(cfg, fine_align=False), embedder=other)
    assert gr.gnn is None and torch.equal(gr.aligner.branches["sar"][0].weight, al.branches["sar"][0].weight)
    m = _Map(dim=24)  # 24-d embeddings: not the refiner's D, fine without a GNN
    q = m.features[:2] + 0.01
    rows, scores = _search(m, q, 4)
    out_rows, pos = gr.refine(q, rows, scores, m, None)
    assert np.array_equal(out_rows, rows) and np.allclose(pos, m.positions[rows[:, 0]])  # the coarse answer, untouched
    bare = save_refiner(tmp_path / "b.pt", refiner_payload(SceneGraphRefiner(D, 16, 1, 2), None, cfg, 4, D, {}))
    with pytest.raises(CheckpointError, match="dense descriptor"):
        aligner_payload(bare)
