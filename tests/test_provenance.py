"""Provenance at the seams: artefacts record the SHA-256 of what they were built from
(``inputs``), consumers compare before use, reports carry the record.

The regression: a refiner trained on embedder A used with a retrained embedder B (same
architecture, other weights) was accepted, since only ``k`` and the embedding size were
compared. Now it is a one-line CheckpointError naming both hashes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmpc.errors import CheckpointError, CmpcError, IndexMismatchError
from cmpc.models.checkpoint import load_checkpoint, save_checkpoint
from cmpc.utils import provenance
from cmpc.utils.io import file_sha256

REFINE_ARGS = (
    "refine.k=4", "refine.epochs=1", "refine.hidden=16", "refine.layers=1", "refine.heads=2", "refine.batch_size=32",
    "refine.fine_align=false", "refine.align_steps=0", "train.threads=1", "eval.plots=false",
)


# --------------------------------------------------------------------------- the check itself


def test_check_names_both_hashes(tmp_path: Path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    rec = provenance.record(a)
    assert rec == {"path": str(a), "sha256": file_sha256(a)}
    provenance.check(rec, a, artefact="thing", role="embedder", fix="do X")  # same bytes: fine
    provenance.check(rec["sha256"], provenance.record(a), artefact="thing", role="embedder", fix="do X")
    with pytest.raises(CheckpointError) as e:
        provenance.check(rec, b, artefact="thing", role="embedder", fix="do X")
    msg = str(e.value)
    assert "\n" not in msg and file_sha256(a)[:12] in msg and file_sha256(b)[:12] in msg and msg.endswith("do X")
    with pytest.raises(CheckpointError, match="does not record the embedder.*do X"):
        provenance.check(None, b, artefact="thing", role="embedder", fix="do X")
    # the older {"path", "hash"} form is read too
    provenance.check({"path": "x", "hash": file_sha256(a)}, a, artefact="thing", role="embedder", fix="do X")
    with pytest.raises(CheckpointError, match="file not found"):
        provenance.record(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- embedder -> refiner -> localizer / reports


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A tiny dataset, embedder A (runs/prov/emb_best.pt), a refiner trained on it, and
    embedder B: A's architecture with perturbed weights."""
    import os

    from index_fixtures import experiment, train_refiner_command, write_checkpoint, write_dataset

    tmp = tmp_path_factory.mktemp("prov")
    old = os.getcwd()
    os.chdir(tmp)  # index/ and reports/ are relative to the working directory
    try:
        root = tmp / "ds"
        write_dataset(root, split="train", seed=0, grid=5, patch_px=16, non_aligned=10)
        write_dataset(root, split="test", seed=1, grid=4, patch_px=16, id_offset=1000, non_aligned=4)
        exp = experiment("prov", root, *REFINE_ARGS)
        a = write_checkpoint(exp.run_dir / "emb_best.pt", img_size=16, embed_dim=16)
        refiner = train_refiner_command(exp)
        ck = load_checkpoint(a)
        ck["model"] = {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in ck["model"].items()}
        b = save_checkpoint(tmp / "retrained" / "emb_best.pt", ck)
        yield {"tmp": tmp, "root": root, "exp": exp, "a": a, "b": b, "refiner": refiner}
    finally:
        os.chdir(old)


def test_refiner_records_what_it_was_trained_from(world):
    from cmpc.index.store import MANIFEST_FILE

    ck = load_checkpoint(world["refiner"])
    inputs = ck["inputs"]
    assert inputs["embedder"] == {"path": str(world["a"]), "sha256": file_sha256(world["a"])}
    manifest = Path(inputs["index"]["path"])
    assert manifest.name == MANIFEST_FILE and inputs["index"]["sha256"] == file_sha256(manifest)


def test_refiner_of_another_embedder_is_refused(world, monkeypatch: pytest.MonkeyPatch):
    from cmpc.index.build import build_index
    from cmpc.localize.localizer import Localizer

    monkeypatch.chdir(world["tmp"])
    exp, a, b = world["exp"], world["a"], world["b"]
    ha, hb = file_sha256(a), file_sha256(b)
    assert ha != hb
    build_index(exp, checkpoint=str(b))  # the index agrees with B: only the refiner is stale
    with pytest.raises(CmpcError) as e:
        Localizer.from_experiment(exp, b)
    msg = str(e.value)
    assert isinstance(e.value, CheckpointError) and "\n" not in msg
    assert ha[:12] in msg and hb[:12] in msg and "cmpc train refine" in msg, msg
    # without the refiner, B and its index work
    assert Localizer.from_experiment(exp, b, use_refiner=False).refiner is None
    # and the index built by B is refused with A, naming both hashes too
    with pytest.raises(IndexMismatchError) as e:
        Localizer.from_experiment(exp, a, index_dir=exp.index_dir)
    assert ha[:12] in str(e.value) and hb[:12] in str(e.value)


def test_older_refiner_records(world, tmp_path: Path):
    from cmpc.localize.refine import refiner_from_checkpoint

    exp, a, b = world["exp"], world["a"], world["b"]
    ck = load_checkpoint(world["refiner"])
    # the older record (stats.embedder {path, hash}) is compared like the new one
    del ck["inputs"]
    legacy = save_checkpoint(tmp_path / "legacy.pt", ck)
    assert refiner_from_checkpoint(legacy, exp.refine, embedder=a).k == 4
    with pytest.raises(CheckpointError, match=file_sha256(b)[:12]):
        refiner_from_checkpoint(legacy, exp.refine, embedder=b)
    # no record at all: refused, saying to retrain
    del ck["stats"]["embedder"]
    bare = save_checkpoint(tmp_path / "bare.pt", ck)
    with pytest.raises(CheckpointError, match="does not record the embedder.*cmpc train refine"):
        refiner_from_checkpoint(bare, exp.refine, embedder=a)


def test_reports_carry_the_inputs_record(world, monkeypatch: pytest.MonkeyPatch):
    from index_fixtures import evaluate_command, localize_command

    from cmpc.index.build import build_index
    from cmpc.index.store import MANIFEST_FILE

    monkeypatch.chdir(world["tmp"])
    exp, a = world["exp"], world["a"]
    build_index(exp)  # back to embedder A
    manifest = exp.index_dir / MANIFEST_FILE
    want = {
        "embedder": file_sha256(a),
        "index": file_sha256(manifest),
        "refiner": file_sha256(world["refiner"]),
    }
    metrics = evaluate_command(exp)
    on_disk = json.loads((exp.report_dir / "metrics.json").read_text())
    for meta in (metrics["meta"], on_disk["meta"]):
        got = meta["inputs"]
        assert {k: v["sha256"] for k, v in got.items()} == want
        assert Path(got["embedder"]["path"]).resolve() == a.resolve()
        assert Path(got["index"]["path"]).resolve() == manifest.resolve()
        assert Path(got["refiner"]["path"]).resolve() == world["refiner"].resolve()
    s = localize_command(exp, str(world["root"]), out=str(world["tmp"] / "loc"))
    assert s["refined"]
    meta = json.loads((world["tmp"] / "loc" / "metrics.json").read_text())["meta"]
    assert {k: v["sha256"] for k, v in meta["inputs"].items()} == want


# --------------------------------------------------------------------------- embedder trainer


def test_embedder_records_init_weights_and_refuses_a_changed_file(tmp_path: Path):
    from emb_tiny_data import make_tiny_dataset

    from cmpc.config import ModelConfig, load_experiment
    from cmpc.models.embedder import build_embedder
    from cmpc.train.emb import fit_embedder

    root = make_tiny_dataset(tmp_path / "ds", grid=(5, 6))
    model_args = ["model.backbone=cmpc_cnn_s", "model.embed_dim=16", "model.stem_channels=8"]

    def trunk_file(seed: int) -> Path:
        torch.manual_seed(seed)
        m = build_embedder(ModelConfig(backbone="cmpc_cnn_s", embed_dim=16, stem_channels=8), 1, 3)
        path = tmp_path / "trunk.pt"
        torch.save(next(iter(m.trunks.values())).state_dict(), path)
        return path

    w = trunk_file(0)
    exp = load_experiment(None, [
        "name=emb", f"runs_dir={tmp_path / 'runs'}", f"data.root={root}", "data.img_size=32", *model_args,
        f"model.weights={w}", "train.epochs=1", "train.batch_size=8", "train.max_steps_per_epoch=2", "train.threads=1",
        "train.val_fraction=0.2", "loss.critic_hidden=16", "train.device=cpu",
    ])
    res = fit_embedder(exp)
    h0 = file_sha256(w)
    for path in (res.best_path, res.last_path):
        assert load_checkpoint(path)["inputs"] == {"init_weights": {"path": str(w), "sha256": h0}}
    trunk_file(1)  # the file at model.weights changes
    h1 = file_sha256(w)
    with pytest.raises(CheckpointError) as e:
        fit_embedder(exp)
    assert h0[:12] in str(e.value) and h1[:12] in str(e.value) and "model.weights" in str(e.value)


# --------------------------------------------------------------------------- translators


def test_segcyclegan_records_its_judges_and_reports_record_the_translator(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from translate_world import experiment_dict, make_world

    from cmpc.config import experiment_from_dict
    from cmpc.translate.apply import apply_translator
    from cmpc.translate.evaluate import evaluate_translator
    from cmpc.translate.segment import seg_dir
    from cmpc.translate.train import _same_inputs, train_translator

    torch.set_num_threads(1)
    paths = make_world(tmp_path / "w")
    exp = experiment_from_dict(experiment_dict(paths, tmp_path, model="segcyclegan", out=str(tmp_path / "sg"), max_steps_per_epoch=1))
    last = train_translator(exp, progress=False)
    segs = {m: seg_dir(exp) / f"seg_{m}.pt" for m in ("opt", "sar")}
    want = {f"seg_{m}": {"path": str(p), "sha256": file_sha256(p)} for m, p in segs.items()}
    assert load_checkpoint(last)["inputs"] == want
    state = load_checkpoint(tmp_path / "sg" / "state.pt")
    assert state["inputs"] == want
    # a state trained with other judges is not resumed; the line names both hashes
    other = {**want, "seg_opt": {"path": want["seg_opt"]["path"], "sha256": "ab" * 32}}
    capsys.readouterr()
    assert _same_inputs(state, other, tmp_path / "sg" / "state.pt") is None
    err = capsys.readouterr().err
    assert "not resuming" in err and want["seg_opt"]["sha256"][:12] in err and "abababababab" in err
    assert _same_inputs(state, want, tmp_path / "sg" / "state.pt") is state

    res = evaluate_translator(exp, last, out=tmp_path / "ev")
    got = res["meta"]["inputs"]
    assert got["translator"] == {"path": str(last), "sha256": file_sha256(last)}
    assert all(got[f"seg_{m}"]["sha256"] == file_sha256(p) for m, p in segs.items() if f"seg_{m}" in got) and "seg_opt" in got
    summary = apply_translator(exp, last, direction="opt2sar", out=tmp_path / "pseudo", progress=False)
    ds = json.loads((Path(summary["out"]) / "dataset.json").read_text())
    assert ds["inputs"]["translator"]["sha256"] == file_sha256(last)
