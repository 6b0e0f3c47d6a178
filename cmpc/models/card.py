"""Shipped models: a folder of weights plus ``card.json``, the model card that carries the configuration.

``cmpc index build --model sentinel --raster MAP.tif --name mymap`` and ``cmpc localize
--model sentinel --index mymap --queries S1.tif`` need no experiment file: the card says
which files make the model, how to rebuild the experiment and what inputs it takes.

Layout (``weights/<model>/``, tracked in git; ``.gitignore`` re-includes ``weights/**``)::

    card.json       machine-readable, below
    MODEL_CARD.md   human-readable: data, recipe, numbers, conventions, licence
    embedder.pt     the embedder checkpoint (cmpc.models.checkpoint format)
    refiner.pt      optional: the refiner checkpoint
    aligner.pt      optional: a dense descriptor alone (``cmpc model aligner``), for the
                    fine alignment of scene georeferencing when no refiner is shipped
    scene_decision.json  optional: the calibrated scene decision of ``cmpc georef`` for this
                    embedder (``cmpc train scene --out``); ``cmpc georef --model`` uses it
    scene_graph.pt  optional, beside scene_decision.json: the scene-graph GNN of ``gnn+verify``
                    (``cmpc train scene``), trained on this embedder's answers; a
                    ``scene_graph.pt`` the card does not list is never loaded

``card.json``::

    {"card_version": 1,
     "name": "sentinel", "description": "...",
     "files": {"embedder": {"path": "embedder.pt", "sha256": hex, "bytes": int},
               "refiner":  {"path": "refiner.pt",  "sha256": hex, "bytes": int},    # optional
               "aligner":  {"path": "aligner.pt",  "sha256": hex, "bytes": int},    # optional
               "scene_decision": {"path": "scene_decision.json", ...},           # optional
               "scene_graph": {"path": "scene_graph.pt", ...}},                  # optional, needs scene_decision
     "experiment": {"model": {...}, "data": {"img_size": 128}, "index": {...},
                    "localize": {...}, "refine": {...}, ...},    # cmpc.config sections, validated as a file's
     "inputs": {"sar": {"bands": 1, "band_names": ["VH"], "polarisation": "VH", "dtype": "uint8",
                        "scaling": "...", "product": "..."},
                "optical": {"bands": 3, "band_names": ["B04", "B03", "B02"], "dtype": "uint8", ...},
                "gsd_m": [7, 12], "patch_m": 1062.4},              # cmpc.data.conventions.InputConventions
     "metrics": {...}, "licence": "...", "credit": "...", "data": ..., "recipe": ..., "created": "..."}

Paths in ``files`` are relative to the card's folder and stay inside it. A model is named
on the command line by a registered name (a folder of the weights root:
``$CMPC_WEIGHTS`` when set, else the repository's ``weights/`` beside the ``cmpc``
package), a folder holding ``card.json``, or the path of a card file (:func:`card_path`).

Trust: :func:`load_card` checks each file's size and SHA-256 against the card before any
loader sees it (a mismatch, a missing file or an unsealed card is one line,
:class:`~cmpc.errors.CheckpointError`, exit 2); the checkpoints are then loaded by the
usual loaders with ``torch.load(weights_only=True)``. Indexes built with a card's embedder
record its SHA-256 in their manifest like any other, so an index of another model is
refused at query time. :func:`seal_card` records the sizes and hashes (and the embedder's
model configuration and input size) after whoever trains the model copies the files in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmpc.config import Experiment, load_experiment
from cmpc.data.conventions import InputConventions
from cmpc.errors import CheckpointError, ConfigError
from cmpc.utils.io import atomic_write_json, file_sha256

CARD_FILE = "card.json"
#: environment variable naming another weights root (registered models = its folders)
WEIGHTS_ENV = "CMPC_WEIGHTS"
CARD_VERSION = 1
_ROLES = ("embedder", "refiner", "aligner", "scene_decision", "scene_graph")
#: the file name a scene decision must have (cmpc.localize.georef.DECISION_FILE: georef reads it from its folder)
SCENE_DECISION_NAME = "scene_decision.json"
#: the file name of a scene-graph GNN (cmpc.localize.georef.SCENE_GRAPH_FILE), in the decision's folder
SCENE_GRAPH_NAME = "scene_graph.pt"
_TOP_KEYS = ("card_version", "name", "description", "files", "experiment", "inputs", "metrics", "licence", "credit",
             "data", "recipe", "created")


def weights_root() -> Path:
    """Where registered models live: ``$CMPC_WEIGHTS``, else ``<repository>/weights`` (beside the ``cmpc`` package)."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "weights"


def registered_models() -> list[str]:
    """Names of the folders of :func:`weights_root` that hold a ``card.json``."""
    root = weights_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CARD_FILE).is_file())


def card_path(model: str | os.PathLike[str]) -> Path:
    """The ``card.json`` that ``--model`` names: a registered name (a plain word: a folder of
    :func:`weights_root`), a folder holding ``card.json``, or a card file. One-line
    :class:`ConfigError` listing the registered names otherwise."""
    text = str(model)
    if not text:
        raise ConfigError("--model is empty; give a registered model name or a card.json path")
    plain = os.sep not in text and "/" not in text and not text.endswith(".json")
    if plain:
        registered = weights_root() / text / CARD_FILE
        if registered.is_file():
            return registered
    p = Path(text)
    if p.is_file():
        return p
    if p.is_dir() and (p / CARD_FILE).is_file():
        return p / CARD_FILE
    names = registered_models()
    raise ConfigError(
        f"--model {text!r}: no registered model of that name under {weights_root()} and no card file there "
        f"(registered: {', '.join(names) if names else 'none'}; or give the path of a card.json)"
    )


@dataclass(frozen=True)
class CardFile:
    """One file of a model: ``role`` (embedder / refiner), ``path`` (resolved), ``sha256``, ``bytes``."""

    role: str
    path: Path
    sha256: str | None
    bytes: int | None

    def record(self) -> dict[str, str]:
        """``{"path", "sha256"}``: the provenance record (:mod:`cmpc.utils.provenance`)."""
        return {"path": str(self.path), "sha256": str(self.sha256)}


@dataclass(frozen=True)
class ModelCard:
    """A loaded, validated model card (see the module doc)."""

    name: str
    path: Path
    description: str
    embedder: CardFile
    refiner: CardFile | None
    experiment: dict[str, Any]
    inputs: InputConventions
    raw: dict[str, Any]
    scene_decision: CardFile | None = None
    aligner: CardFile | None = None
    scene_graph: CardFile | None = None

    @property
    def files(self) -> list[CardFile]:
        """The card's files (embedder first; the optional ones when listed)."""
        return [f for f in (self.embedder, self.refiner, self.aligner, self.scene_decision, self.scene_graph) if f is not None]

    @property
    def folder(self) -> Path:
        """The folder holding the card and its files."""
        return self.path.parent

    def to_experiment(self, overrides: list[str] | None = None, name: str | None = None) -> Experiment:
        """The card's configuration as an :class:`Experiment` named ``name`` (default the
        model's name), with ``--set`` ``overrides`` applied on top. A key the configuration
        does not know is a one-line :class:`ConfigError` naming the card."""
        base = {**self.experiment, "name": name or self.name}
        try:
            load_experiment(None, None, base=base)
        except ConfigError as e:
            raise ConfigError(f"model card {self.path}: {e}") from None
        return load_experiment(None, overrides, base=base)  # an error now is the overrides'

    def verify(self) -> None:
        """Check every file against the card: present, same size, same SHA-256 (one line otherwise)."""
        for f in self.files:
            _verify_file(self, f)


def _verify_file(card: ModelCard, f: CardFile) -> None:
    if not f.path.is_file():
        raise CheckpointError(f"model {card.name!r}: its {f.role} {f.path} is missing (not shipped yet, or deleted); card {card.path}")
    if not f.sha256:
        raise CheckpointError(f"model card {card.path} records no sha256 for its {f.role}; seal it first: cmpc model seal {card.folder}")
    size = f.path.stat().st_size
    if f.bytes is not None and size != f.bytes:
        raise CheckpointError(
            f"model {card.name!r}: {f.path} has {size} bytes but the card {card.path} says {f.bytes}; "
            f"the file was replaced or truncated: restore it (git checkout {card.folder}) or re-seal the card (cmpc model seal {card.folder})"
        )
    got = file_sha256(f.path)
    if got != f.sha256:
        raise CheckpointError(
            f"model {card.name!r}: {f.path} has sha256 {got[:12]} but the card {card.path} says {f.sha256[:12]}; "
            f"the file was replaced or corrupted: restore it (git checkout {card.folder}) or re-seal the card (cmpc model seal {card.folder})"
        )


def _read_card_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the model card {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"malformed JSON in the model card {path}: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"the model card {path} must hold a JSON object")
    return raw


def _card_file(raw: Any, role: str, folder: Path, where: Path) -> CardFile:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str) or not raw["path"]:
        raise ConfigError(f"model card {where}: files.{role} must be an object with 'path' (relative to the card), 'sha256' and 'bytes'")
    rel = Path(raw["path"])
    if rel.is_absolute() or ".." in rel.parts:
        raise ConfigError(f"model card {where}: files.{role}.path {raw['path']!r} must be relative to the card's folder and stay inside it")
    sha = raw.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise ConfigError(f"model card {where}: files.{role}.sha256 must be 64 lowercase hex digits or null, got {sha!r}")
    size = raw.get("bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ConfigError(f"model card {where}: files.{role}.bytes must be a byte count or null, got {size!r}")
    return CardFile(role, folder / rel, sha, size)


def parse_card(raw: dict[str, Any], path: Path) -> ModelCard:
    """Validate the JSON of a card at ``path`` into a :class:`ModelCard` (files not checked)."""
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"model card {path}: unknown key '{unknown[0]}'; valid keys: {list(_TOP_KEYS)}")
    version = raw.get("card_version", CARD_VERSION)
    if version != CARD_VERSION:
        raise ConfigError(f"model card {path}: card_version {version!r} is not supported by this cmpc (it reads {CARD_VERSION})")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"model card {path}: 'name' must be a plain non-empty name, got {name!r}")
    files = raw.get("files")
    if not isinstance(files, Mapping) or "embedder" not in files:
        raise ConfigError(f"model card {path}: 'files' must name at least the embedder: {{\"embedder\": {{\"path\", \"sha256\", \"bytes\"}}}}")
    bad = sorted(set(files) - set(_ROLES))
    if bad:
        raise ConfigError(f"model card {path}: unknown file role '{bad[0]}'; valid: {list(_ROLES)}")
    exp = raw.get("experiment")
    if not isinstance(exp, dict):
        raise ConfigError(f"model card {path}: 'experiment' must be an object of cmpc config sections (model, data, index, localize, refine, ...)")
    if "extends" in exp:
        raise ConfigError(f"model card {path}: 'experiment' cannot use 'extends' (a card carries its whole configuration)")
    folder = path.parent
    card = ModelCard(
        name=name, path=path, description=str(raw.get("description", "")),
        embedder=_card_file(files["embedder"], "embedder", folder, path),
        refiner=_card_file(files["refiner"], "refiner", folder, path) if files.get("refiner") is not None else None,
        experiment=exp, inputs=InputConventions.from_dict(raw.get("inputs"), f"model card {path}"), raw=raw,
        scene_decision=_card_file(files["scene_decision"], "scene_decision", folder, path) if files.get("scene_decision") is not None else None,
        aligner=_card_file(files["aligner"], "aligner", folder, path) if files.get("aligner") is not None else None,
        scene_graph=_card_file(files["scene_graph"], "scene_graph", folder, path) if files.get("scene_graph") is not None else None,
    )
    if card.scene_decision is not None and card.scene_decision.path.name != SCENE_DECISION_NAME:
        raise ConfigError(f"model card {path}: files.scene_decision.path must name a file called {SCENE_DECISION_NAME} (georef reads it from its folder)")
    if card.scene_graph is not None:
        if card.scene_decision is None:
            raise ConfigError(f"model card {path}: files.scene_graph needs files.scene_decision (the gnn+verify decision is calibrated with the GNN)")
        if card.scene_graph.path.name != SCENE_GRAPH_NAME or card.scene_graph.path.parent != card.scene_decision.path.parent:
            raise ConfigError(f"model card {path}: files.scene_graph.path must name a file called {SCENE_GRAPH_NAME} beside {card.scene_decision.path.name} "
                              "(georef reads both from one folder)")
    card.to_experiment()  # an unknown or invalid key is refused here, before any file is read
    return card


def load_card(model: str | os.PathLike[str], verify: bool = True) -> ModelCard:
    """The card ``--model`` names (:func:`card_path`), validated; with ``verify`` its files are
    checked against the recorded sizes and SHA-256 (:meth:`ModelCard.verify`) before anything loads them."""
    path = card_path(model)
    card = parse_card(_read_card_json(path), path)
    if verify:
        card.verify()
    return card


def seal_card(folder_or_card: str | os.PathLike[str]) -> dict[str, Any]:
    """Record in ``card.json`` the size and SHA-256 of each listed file present, and the
    embedder checkpoint's model configuration and input size (``experiment.model``,
    ``data.img_size``), so the card describes the weights beside it. The checkpoint is
    loaded with ``weights_only=True`` and must be an embedder. Returns the new card JSON
    (written atomically)."""
    from cmpc.models.checkpoint import load_checkpoint

    path = card_path(folder_or_card)
    raw = _read_card_json(path)
    card = parse_card(raw, path)
    for f in card.files:
        if not f.path.is_file():
            raise CheckpointError(f"cannot seal {path}: its {f.role} {f.path} is missing")
        raw["files"][f.role]["sha256"] = file_sha256(f.path)
        raw["files"][f.role]["bytes"] = f.path.stat().st_size
    ckpt = load_checkpoint(card.embedder.path)
    if ckpt.get("kind") != "embedder" or "model_cfg" not in ckpt:
        raise CheckpointError(f"cannot seal {path}: {card.embedder.path} is not an embedder checkpoint (kind={ckpt.get('kind')!r})")
    model = {k: v for k, v in dict(ckpt["model_cfg"]).items() if k not in ("pretrained", "weights")}
    model.update(sar_channels=int(ckpt["sar_channels"]), optical_channels=int(ckpt["optical_channels"]))
    raw["experiment"]["model"] = model
    raw["experiment"].setdefault("data", {})["img_size"] = int(ckpt["img_size"])
    if card.scene_decision is not None:  # calibrated on this embedder's answers, or it would be ignored at query time
        try:
            with_ = json.loads(card.scene_decision.path.read_text(encoding="utf-8")).get("embedder_sha256")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot seal {path}: {card.scene_decision.path} is not readable JSON ({e})") from None
        if with_ != raw["files"]["embedder"]["sha256"]:
            raise CheckpointError(
                f"cannot seal {path}: {card.scene_decision.path} was calibrated with embedder {str(with_)[:12]}, not this card's "
                f"({raw['files']['embedder']['sha256'][:12]}); recalibrate it with `cmpc train scene ... --checkpoint {card.embedder.path}`"
            )
    if card.scene_graph is not None:  # trained on this embedder's answers (load_scene_graph refuses another's)
        from cmpc.models.scene_graph import load_scene_graph

        try:
            load_scene_graph(card.scene_graph.path, {"path": str(card.embedder.path), "sha256": raw["files"]["embedder"]["sha256"]})
        except CheckpointError as e:
            raise CheckpointError(f"cannot seal {path}: {e}") from None
    parse_card(raw, path)  # still valid
    atomic_write_json(path, raw)
    return raw


def card_summary(card: ModelCard) -> dict[str, Any]:
    """JSON-ready facts of a card for ``cmpc model info``: name, files, inputs, metrics."""
    files = {f.role: {"path": str(f.path), "sha256": f.sha256, "bytes": f.bytes, "present": f.path.is_file()} for f in card.files}
    return {
        "name": card.name, "card": str(card.path), "description": card.description, "files": files,
        "inputs": dataclasses.asdict(card.inputs), "metrics": card.raw.get("metrics"),
        "licence": card.raw.get("licence"), "credit": card.raw.get("credit"),
    }
