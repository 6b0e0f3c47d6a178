"""Experiment configuration: loading, validation, overrides, inheritance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmpc.cli import main
from cmpc.config import Experiment, describe, load_experiment
from cmpc.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, obj, name: str = "exp.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def test_defaults_and_name_from_file(tmp_path):
    exp = load_experiment(_write(tmp_path, {"train": {"epochs": 7}}, "my_run.json"))
    assert exp.name == "my_run"
    assert exp.train.epochs == 7
    assert exp.train.batch_size == Experiment().train.batch_size
    assert exp.run_dir == Path("runs/my_run")
    assert exp.index_dir == Path("index/my_run")


@pytest.mark.parametrize("exp_file", sorted((REPO / "experiments").rglob("*.json")), ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_shipped_experiments_are_valid(exp_file):
    raw = json.loads(exp_file.read_text())
    exp = load_experiment(exp_file)
    # The name is the file's own (or its stem), never inherited from an `extends` parent.
    assert exp.name == raw.get("name", exp_file.stem)
    # Output folders follow the name: a shipped file pins no report folder, so
    # `--set name=X` never writes into another experiment's reports.
    assert exp.eval.out is None and exp.report_dir == Path("reports") / exp.name
    assert exp.run_dir == Path("runs") / exp.name
    # What the file says is what the run gets (values survive validation unchanged).
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert getattr(getattr(exp, section), key) == value, f"{exp_file.name}: {section}.{key}"


def test_unknown_key_names_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_experiment(_write(tmp_path, {"train": {"epoch": 3}}))
    msg = str(e.value)
    assert "train.epoch" in msg and "epochs" in msg and "\n" not in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_experiment(_write(tmp_path, {"trian": {}}))


def test_wrong_type_and_range(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs.*expected int"):
        load_experiment(_write(tmp_path, {"train": {"epochs": "ten"}}))
    with pytest.raises(ConfigError, match="train.epochs.*expected int"):
        load_experiment(_write(tmp_path, {"train": {"epochs": 2.5}}))
    with pytest.raises(ConfigError, match="below the minimum"):
        load_experiment(_write(tmp_path, {"train": {"lr": 0}}))
    with pytest.raises(ConfigError, match=r"not one of \['cross-area', 'same-area'\]"):
        load_experiment(_write(tmp_path, {"tile": {"split": "diagonal"}}))
    # ints are accepted where floats are expected, bools are not ints
    assert load_experiment(_write(tmp_path, {"train": {"lr": 1}})).train.lr == 1.0
    with pytest.raises(ConfigError):
        load_experiment(_write(tmp_path, {"train": {"epochs": True}}))


def test_malformed_json_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="malformed JSON.*line 1"):
        load_experiment(_write(tmp_path, '{"train": {"epochs": 3,}}'))


def test_overrides(tmp_path):
    p = _write(tmp_path, {"train": {"epochs": 3}})
    exp = load_experiment(p, ["train.epochs=5", "model.backbone=resnet18", "eval.ks=[1,2]", "name=other"])
    assert exp.train.epochs == 5 and exp.model.backbone == "resnet18" and exp.eval.ks == [1, 2]
    assert exp.name == "other"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_experiment(p, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_experiment(p, ["nope.x=1"])


def test_extends_merges_sections(tmp_path):
    _write(tmp_path, {"train": {"epochs": 3, "lr": 0.01}, "model": {"embed_dim": 64}}, "base.json")
    child = _write(tmp_path, {"extends": "base.json", "train": {"epochs": 9}}, "child.json")
    exp = load_experiment(child)
    assert (exp.train.epochs, exp.train.lr, exp.model.embed_dim) == (9, 0.01, 64)
    loop = _write(tmp_path, {"extends": "loop.json"}, "loop.json")
    with pytest.raises(ConfigError, match="circular"):
        load_experiment(loop)


def test_save_roundtrip(tmp_path):
    exp = load_experiment(None, ["train.epochs=4", "name=x"])
    exp.save(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    again = load_experiment(_write(tmp_path, raw, "again.json"))
    assert again.to_dict() == exp.to_dict()


def test_describe_lists_every_section():
    text = describe()
    for section in ("[synth]", "[tile]", "[model]", "[train]", "[index]", "[refine]", "[eval]"):
        assert section in text


def test_cli_reports_one_line_error(tmp_path, capsys):
    p = _write(tmp_path, {"model": {"embed_dimm": 3}})
    assert main(["config", "show", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'model.embed_dimm'") and "\n" not in err
