"""Embedding trainer: learning, logs and checkpoints, resume, config checks, DDP (gloo, 2 processes)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from cmpc.config import Experiment, load_experiment
from cmpc.errors import ConfigError
from cmpc.models.checkpoint import load_checkpoint, load_embedder
from cmpc.train.emb import TrainingInterrupted, fit_embedder
from cmpc.utils.io import read_jsonl
from emb_tiny_data import make_tiny_dataset


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 references (8 x 10 grid, 32 px), one aligned + one non-aligned SAR query each."""
    return make_tiny_dataset(tmp_path_factory.mktemp("emb") / "ds", grid=(8, 10))


def _exp(root: Path, runs: Path, name: str, *extra: str) -> Experiment:
    return load_experiment(
        None,
        [
            f"name={name}",
            f"runs_dir={runs}",
            f"data.root={root}",
            "data.img_size=32",
            "model.backbone=cmpc_cnn_s",
            "model.pool=grid",
            "model.embed_dim=64",
            "model.stem_channels=8",
            "train.batch_size=16",
            "train.lr=0.003",
            "train.val_fraction=0.2",
            "train.threads=1",
            "loss.critic_hidden=32",
            *extra,
        ],
    )


@pytest.mark.slow
def test_training_raises_validation_recall(tiny_root: Path, tmp_path: Path) -> None:
    exp = _exp(tiny_root, tmp_path, "learn", "train.epochs=15")
    res = fit_embedder(exp)
    run = tmp_path / "learn"
    vals = [r for r in read_jsonl(run / "log.jsonl") if r["kind"] == "val"]
    assert len(vals) == 15
    # 16 validation references (the two western columns): chance R@1 = 1/16.
    assert vals[0]["recall"]["1"] <= 0.25
    assert max(v["recall"]["1"] for v in vals) >= 0.5
    assert res.metrics["1"] == max(v["recall"]["1"] for v in vals)
    steps = [r for r in read_jsonl(run / "log.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert {"epoch", "loss", "losses", "lr", "img_per_s", "seconds", "temperature", "critic_w"} <= set(steps[0])
    assert set(steps[0]["losses"]) == {"triplet", "infonce", "critic"}
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 15
    model, meta = load_embedder(res.best_path)  # weights_only=True load of a plain-data payload
    assert meta["metrics"] == res.metrics and meta["img_size"] == 32 and meta["sar_channels"] == 1
    last = load_checkpoint(run / "emb_last.pt")
    assert last["finished"] and {"optimizer", "scheduler", "critic", "critic_optimizer", "rng", "sampler"} <= set(last)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _tensors(v).items()})
        elif isinstance(v, (list, tuple)):
            out.update({f"{k}.{i}.{kk}": vv for i, item in enumerate(v) if isinstance(item, dict) for kk, vv in _tensors(item).items()})
    return out


# 2 epochs x 4 steps; saves at steps 3, 4 (epoch end), 6, 8. Embedding mining from epoch 1,
# gradient-penalty critic, augmentation on: every source of state is exercised.
_RESUME_ARGS = ("train.epochs=2", "train.batch_size=8", "train.max_steps_per_epoch=4", "train.save_every_steps=3", "train.mining_start_epoch=1", "train.ema=0.9")


@pytest.mark.slow
def test_resume_mid_epoch_ends_with_the_same_weights(tiny_root: Path, tmp_path: Path) -> None:
    straight = fit_embedder(_exp(tiny_root, tmp_path, "straight", *_RESUME_ARGS))
    assert straight.step == 8

    exp = _exp(tiny_root, tmp_path, "killed", *_RESUME_ARGS)
    with pytest.raises(TrainingInterrupted):
        fit_embedder(exp, stop_after_steps=7)  # "killed" at step 7; last save at step 6, mid-epoch 2
    saved = load_checkpoint(tmp_path / "killed" / "emb_last.pt")
    assert (saved["step"], saved["sampler"]["epoch"], saved["sampler"]["start_batch"]) == (6, 1, 2)
    assert saved["sampler"]["embedding"] is not None  # the mined neighbour table travels with it

    with pytest.raises(ConfigError, match="train.lr"):
        fit_embedder(_exp(tiny_root, tmp_path, "killed", *_RESUME_ARGS, "train.lr=0.001"))

    resumed = fit_embedder(_exp(tiny_root, tmp_path, "killed", *_RESUME_ARGS, "train.threads=1", "data.num_workers=0"))
    assert resumed.step == 8
    a = load_checkpoint(tmp_path / "straight" / "emb_last.pt")
    b = load_checkpoint(tmp_path / "killed" / "emb_last.pt")
    for part in ("model", "optimizer", "critic", "critic_optimizer", "losses", "ema"):
        ta, tb = _tensors(a[part]), _tensors(b[part])
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.allclose(ta[k].float(), tb[k].float(), atol=1e-6, rtol=0), f"{part}.{k} differs after resume"
    # The log has every step once: records after the step-6 save were dropped and redone.
    steps = [r["step"] for r in read_jsonl(tmp_path / "killed" / "log.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 9))

    # A finished run is not retrained.
    log_before = (tmp_path / "straight" / "log.jsonl").read_text()
    again = fit_embedder(_exp(tiny_root, tmp_path, "straight", *_RESUME_ARGS))
    assert again.already_finished and again.step == 8
    assert (tmp_path / "straight" / "log.jsonl").read_text() == log_before


@pytest.mark.slow
def test_weight_ema_is_validated_beside_the_raw_weights(tiny_root: Path, tmp_path: Path) -> None:
    """train.ema: the EMA copy follows the weights (decay ~0: it equals them; decay near 1: it
    stays near the weights after the first step), both are validated, the better is kept."""
    args = ("train.epochs=2", "train.batch_size=8", "train.max_steps_per_epoch=4")
    follow = fit_embedder(_exp(tiny_root, tmp_path, "ema_follow", *args, "train.ema=0.000001"))
    last = load_checkpoint(tmp_path / "ema_follow" / "emb_last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    raw = last["model"]
    assert ema.keys() == raw.keys()
    assert all(torch.allclose(ema[k], raw[k], atol=1e-5) for k in raw if raw[k].is_floating_point())  # int counters aside
    vals = [r for r in read_jsonl(tmp_path / "ema_follow" / "log.jsonl") if r["kind"] == "val"]
    assert len(vals) == 2 and all(v["recall_ema"] == v["recall"] for v in vals)

    slow = fit_embedder(_exp(tiny_root, tmp_path, "ema_slow", *args, "train.ema=0.99999", "train.lr=0.01"))
    last = load_checkpoint(tmp_path / "ema_slow" / "emb_last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    moved = [float((ema[k].float() - last["model"][k].float()).abs().max()) for k in last["model"] if last["model"][k].is_floating_point()]
    assert max(moved) > 1e-3  # 8 steps at lr 0.01 moved the weights; the slow average did not follow
    best = load_checkpoint(slow.best_path)
    assert best["weights"] in ("raw", "ema")
    vals = [r for r in read_jsonl(tmp_path / "ema_slow" / "log.jsonl") if r["kind"] == "val"]
    chosen = max((r["1"], r["5"]) for v in vals for r in (v["recall"], v["recall_ema"]))
    assert (best["metrics"]["1"], best["metrics"]["5"]) == chosen
    assert follow.metrics


def test_channel_mismatch_and_missing_data_are_one_line_errors(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"model.sar_channels is 2 but the data has 1 band"):
        fit_embedder(_exp(tiny_root, tmp_path, "bands", "model.sar_channels=2"))
    from cmpc.cli import main

    capsys.readouterr()
    cfg = tmp_path / "nodata.json"
    cfg.write_text(json.dumps({"name": "nodata", "runs_dir": str(tmp_path), "data": {"root": str(tmp_path / "nowhere")}}))
    assert main(["train", "emb", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dataset root not found")
    assert not (tmp_path / "nodata" / "emb_last.pt").exists()


def test_translated_views_reach_the_trainer_as_an_argument(tiny_root: Path, tmp_path: Path) -> None:
    """translate.views needs views= and views= needs translate.views; the pairs the views
    function returns are the ones trained on (it is called once, with the progress flag)."""

    class Counting:  # stands in for the translated-views copy of the training pairs
        def __init__(self, pairs) -> None:  # noqa: ANN001 - PairDataset
            self.pairs, self.items = pairs, 0

        def __getitem__(self, key):  # noqa: ANN001, ANN204
            self.items += 1
            return self.pairs[key]

    made: list[tuple[Counting, bool]] = []

    def views(pairs, *, progress: bool) -> Counting:  # noqa: ANN001
        made.append((Counting(pairs), progress))
        return made[-1][0]

    args = ("train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=2", "train.val_fraction=0", "loss.critic=0", "data.num_workers=0")
    with pytest.raises(ValueError, match="no views were passed"):
        fit_embedder(_exp(tiny_root, tmp_path, "v0", *args, f'translate.views=["{tmp_path / "tr.pt"}"]'))
    with pytest.raises(ValueError, match="translate.views is empty"):
        fit_embedder(_exp(tiny_root, tmp_path, "v1", *args), views=views)
    assert made == [] and not (tmp_path / "v0").exists() and not (tmp_path / "v1").exists()
    res = fit_embedder(_exp(tiny_root, tmp_path, "v2", *args, f'translate.views=["{tmp_path / "tr.pt"}"]'), views=views)
    assert res.step == 2 and len(made) == 1
    counting, progress = made[0]
    assert progress is True and counting.items == 2 * 8  # every training item came through the views


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, args: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = fit_embedder(load_experiment(None, args))
    torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes_gloo(tiny_root: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    exp = _exp(tiny_root, tmp_path, "ddp", "train.epochs=2", "train.max_steps_per_epoch=3", "train.mining_start_epoch=1")
    args = [
        f"name={exp.name}",
        f"runs_dir={tmp_path}",
        *[f"{sec}.{k}={json.dumps(v)}" for sec in ("data", "model", "train", "loss") for k, v in getattr(exp, sec).__dict__.items()],
    ]
    # fork: the children inherit the imported modules (spawn would re-import torch and timm: seconds each)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), args, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks differ at {k}"
    last = load_checkpoint(tmp_path / "ddp" / "emb_last.pt")
    assert last["finished"] and last["step"] == 6
    for k, v in last["model"].items():
        assert torch.equal(v, w0[k])
    steps = [r for r in read_jsonl(tmp_path / "ddp" / "log.jsonl") if r["kind"] == "train"]
    assert len(steps) == 6  # rank 0 alone writes the log
    # The ranks trained (identical because synchronised, not because nothing moved).
    from cmpc.models.embedder import build_embedder
    from cmpc.utils.runtime import seed_everything

    seed_everything(exp.train.seed)
    init = build_embedder(exp.model, 1, 3).state_dict()
    moved = [k for k in w0 if w0[k].is_floating_point() and not torch.allclose(w0[k], init[k])]
    assert len(moved) > len(w0) // 2


@pytest.mark.slow
def test_same_weights_with_or_without_loader_workers(tiny_root: Path, tmp_path: Path) -> None:
    # Augmentation and query choice come from (seed, epoch, location), not from worker state.
    args = ("train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=3", "train.val_fraction=0", "loss.critic=0")
    a = fit_embedder(_exp(tiny_root, tmp_path, "w0", *args, "data.num_workers=0"))
    b = fit_embedder(_exp(tiny_root, tmp_path, "w2", *args, "data.num_workers=2"))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_members_are_trained_from_consecutive_seeds_and_fused(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """train.members = 2: two ordinary runs (seeds 3, 4) under runs/<name>/members/, their best
    checkpoints fused into runs/<name>/emb_best.pt, the fused validation recall logged; a second
    call trains nothing and keeps the fusion."""
    from cmpc.models.checkpoint import checkpoint_hash
    from cmpc.models.fusion import FusedEmbedder
    from cmpc.train.emb import member_experiments, train_embedder, validate_checkpoint

    exp = _exp(tiny_root, tmp_path, "duo", "train.epochs=2", "train.members=2", "train.seed=3")
    (tmp_path / "duo").mkdir()
    (tmp_path / "duo" / "emb_last.pt").write_bytes(b"a one-embedder run's state")  # replaced by the fusion: removed
    subs = member_experiments(exp)
    assert [s.run_dir for s in subs] == [tmp_path / "duo" / "members" / "seed3", tmp_path / "duo" / "members" / "seed4"]
    assert [(s.train.seed, s.train.members) for s in subs] == [(3, 1), (4, 1)]
    best = train_embedder(exp)
    assert best == tmp_path / "duo" / "emb_best.pt" and not (tmp_path / "duo" / "emb_last.pt").exists()
    member_best = [s.run_dir / "emb_best.pt" for s in subs]
    ck = load_checkpoint(best)
    assert [m["sha256"] for m in ck["fusion"]["members"]] == [checkpoint_hash(p) for p in member_best]
    assert load_checkpoint(member_best[0])["model"]["proj.0.weight"].ne(load_checkpoint(member_best[1])["model"]["proj.0.weight"]).any()  # two seeds, two models
    model, meta = load_embedder(best)
    assert isinstance(model, FusedEmbedder) and model.embed_dim == 128
    fused = [r for r in read_jsonl(tmp_path / "duo" / "log.jsonl") if r["kind"] == "fused"]
    assert len(fused) == 1 and fused[0]["recall"] == pytest.approx(validate_checkpoint(model, exp))
    assert 0.0 <= fused[0]["recall"]["1"] <= 1.0 and len(fused[0]["member_recall"]) == 2
    # the members alone are what training validated: the same numbers from their own logs
    for s, rec in zip(subs, fused[0]["member_recall"]):
        vals = [r["recall"] for r in read_jsonl(s.run_dir / "log.jsonl") if r["kind"] == "val"]
        assert rec == max(vals, key=lambda r: (r["1"], r["5"]))
    before = checkpoint_hash(best)
    capsys.readouterr()
    assert train_embedder(exp) == best and checkpoint_hash(best) == before  # nothing retrained, fusion kept
    assert "fusion of 2 members up to date" in capsys.readouterr().err


def test_a_second_training_of_the_same_run_is_refused_at_once(tiny_root: Path, tmp_path: Path) -> None:
    """Two trainings of one run folder would resume from and overwrite the same files."""
    from cmpc.utils.locks import BusyError, exclusive, lock_path

    exp = _exp(tiny_root, tmp_path, "busy", "train.epochs=1")
    with exclusive(lock_path(exp.run_dir), what="embedder training"):  # as another process holding it
        with pytest.raises(BusyError, match="another embedder training of .*busy is running"):
            fit_embedder(exp)
    assert not (tmp_path / "busy" / "emb_last.pt").exists()
