"""Score fusion of embedders packaged as one embedder (``cmpc model fuse``, cmpc.models.fusion)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmpc.cli import main
from cmpc.errors import CheckpointError, ConfigError
from cmpc.models.checkpoint import checkpoint_hash, fuse_checkpoints, load_checkpoint, load_embedder
from index_fixtures import write_checkpoint


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    d = tmp_path_factory.mktemp("fusion")
    return [write_checkpoint(d / f"m{k}.pt", seed=k, embed_dim=16 if k < 2 else 8) for k in range(3)]


def _x(seed: int, bands: int, n: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, bands, 16, 16), generator=g) * 2 - 1


def test_fused_embedding_is_the_weighted_concatenation_and_its_dot_is_the_fused_score(members, tmp_path):
    w = [0.5, 0.3, 0.2]
    out = fuse_checkpoints(tmp_path / "fused.pt", members, [5.0, 3.0, 2.0])  # normalised to w
    fused, meta = load_embedder(out)
    singles = [load_embedder(p)[0] for p in members]
    assert fused.embed_dim == 16 + 16 + 8 and meta["embed_dim"] == 40
    assert meta["fusion"]["weights"] == pytest.approx(w)
    assert meta["fusion"]["members"] == [checkpoint_hash(p) for p in members]
    with torch.no_grad():
        q, r = fused(_x(0, 1), "sar"), fused(_x(1, 3), "opt")
        qs = [m(_x(0, 1), "sar") for m in singles]
        rs = [m(_x(1, 3), "opt") for m in singles]
    # the layout: [sqrt(w_k) e_k]_k, so each block is its member's embedding scaled
    assert torch.allclose(q[:, :16], np.sqrt(0.5) * qs[0], atol=1e-6)
    assert torch.allclose(q[:, 32:], np.sqrt(0.2) * qs[2], atol=1e-6)
    assert torch.allclose(q.norm(dim=1), torch.ones(5), atol=1e-5)  # unit vectors: cosine = dot
    expect = sum(wk * (a @ b.T) for wk, a, b in zip(w, qs, rs))
    assert torch.allclose(q @ r.T, expect, atol=1e-5)  # the fused score sum_k w_k <q_k, r_k>


def test_equal_weights_by_default_and_forward_pair_matches_forward(members, tmp_path):
    fused, meta = load_embedder(fuse_checkpoints(tmp_path / "f.pt", members[:2]))
    assert meta["fusion"]["weights"] == pytest.approx([0.5, 0.5])
    with torch.no_grad():
        s, o = fused.forward_pair(_x(2, 1, 4), _x(3, 3, 4))
        assert torch.allclose(s, fused(_x(2, 1, 4), "sar"), atol=1e-5)
        assert torch.allclose(o, fused(_x(3, 3, 4), "opt"), atol=1e-5)


def test_the_fused_file_stands_alone_and_loads_with_weights_only(members, tmp_path):
    out = fuse_checkpoints(tmp_path / "f.pt", members[:2])
    raw = torch.load(out, weights_only=True)  # plain data only
    assert raw["kind"] == "embedder" and len(raw["fusion"]["members"]) == 2
    assert "optimizer" not in raw["fusion"]["members"][0]
    for p in members[:2]:
        p.rename(p.with_suffix(".moved"))
    try:
        load_embedder(out)  # members' files are not needed any more
    finally:
        for p in members[:2]:
            p.with_suffix(".moved").rename(p)


def test_refusals(members, tmp_path):
    with pytest.raises(ConfigError, match="at least two"):
        fuse_checkpoints(tmp_path / "f.pt", members[:1])
    with pytest.raises(ConfigError, match="overwrite one of its members"):
        fuse_checkpoints(members[0], members[:2])
    with pytest.raises(ConfigError, match="weights must be 2"):
        fuse_checkpoints(tmp_path / "f.pt", members[:2], [1.0, -1.0])
    fused = fuse_checkpoints(tmp_path / "ok.pt", members[:2])
    with pytest.raises(CheckpointError, match="already a fused embedder"):
        fuse_checkpoints(tmp_path / "f2.pt", [fused, members[2]])
    other = write_checkpoint(tmp_path / "four_band.pt", sar_channels=4)
    with pytest.raises(ConfigError, match="different band counts"):
        fuse_checkpoints(tmp_path / "f3.pt", [members[0], other])
    big = write_checkpoint(tmp_path / "big.pt", img_size=32)
    with pytest.raises(ConfigError, match="different input sizes"):
        fuse_checkpoints(tmp_path / "f4.pt", [members[0], big])
    assert not (tmp_path / "f.pt").exists() and not (tmp_path / "f3.pt").exists()  # nothing half-written
    raw = load_checkpoint(fused)
    raw["fusion"]["members"][1]["model"] = {}
    torch.save(raw, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="member 1: weights do not fit"):
        load_embedder(tmp_path / "broken.pt")


def test_cli_fuse_then_index_and_localize_like_any_embedder(members, tmp_path, monkeypatch, capsys):
    """`cmpc model fuse` writes a checkpoint the index and the localizer take as they are."""
    from index_fixtures import experiment, write_dataset

    monkeypatch.chdir(tmp_path)
    rc = main(["model", "fuse", "fused.pt", *map(str, members[:2])])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["sha256"] == checkpoint_hash(tmp_path / "fused.pt")
    write_dataset(tmp_path / "ds", grid=3)
    exp = experiment("fz", tmp_path / "ds")
    from cmpc.index.build import build_index
    from cmpc.localize.localizer import Localizer

    man = build_index(exp, checkpoint="fused.pt")
    assert man["embed_dim"] == 32 and man["checkpoint"]["hash"] == out["sha256"]
    loc = Localizer.from_experiment(exp, checkpoint="fused.pt")
    assert loc.model.embed_dim == 32
    from cmpc.errors import IndexMismatchError

    with pytest.raises(IndexMismatchError, match="was built with checkpoint"):
        Localizer.from_experiment(exp, checkpoint=str(members[0]))  # an index of the fused model refuses a member
