"""The CMPC dataset layout (compatible with SN6-CMPC).

::

    ROOT/{train,test}/annotations/{opt,sar}/<n>.json
    ROOT/{train,test}/imgs/{opt,sar}/<n>.<png|tif>
    ROOT/dataset.json          (optional, this project: CRS, patch size, bands, split)
    ROOT/footprints.gpkg       (optional, this project: one layer per split/modality)

Annotation JSON keys: ``id`` (location id = id of the optical reference the patch belongs
to), ``pos`` {``x``, ``y``} (patch centre, metres in the dataset CRS), ``file_path``
(relative, inside ``imgs/<mode>/``), ``near_id`` (ids of the nearest optical references,
nearest first). Optional extensions: ``crs``, ``bounds`` [minx, miny, maxx, maxy] (metres),
``gsd`` (m/px), ``aligned`` (bool). Unknown keys are kept and written back unchanged.

Reading is strict where a silent coercion would change meaning: ``id`` and every ``near_id``
entry must be JSON integers in 0 .. 2**63-1 (``"55"``, ``55.5``, ``55.0`` and ``true`` are
refused, naming the file); ``file_path`` may not hold a NUL byte; two optical references of
one split may not share an id. ``near_id`` entries naming no optical reference of the split
are allowed but reported once per split, with a count, on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cmpc.errors import DataError
from cmpc.utils.io import atomic_write_json

Split = Literal["train", "test"]
Mode = Literal["opt", "sar"]
SPLITS: tuple[str, ...] = ("train", "test")
MODES: tuple[str, ...] = ("opt", "sar")
_KNOWN = {"id", "pos", "file_path", "near_id", "crs", "bounds", "gsd", "aligned"}
_ID_MAX = 2**63 - 1  # ids are stored as int64 (FAISS, HDF5); -1 means "unknown" inside


def _check_id(v: Any, source: str, what: str) -> int:
    """``v`` as a location id: a JSON integer (not a bool, string or float) in 0 .. 2**63-1."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataError(
            f"{source}: {what} must be an integer, got {type(v).__name__} {json.dumps(v)[:40]}; write it as a plain JSON integer"
        )
    if not 0 <= v <= _ID_MAX:
        raise DataError(f"{source}: {what} {v} is outside 0 .. 2**63-1 (ids are stored as 64-bit integers)")
    return v


def _number(v: Any, source: str, what: str) -> float:
    """``v`` as a float: a JSON number (not a bool or string)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{source}: {what} must be a number, got {type(v).__name__} {json.dumps(v)[:40]}")
    return float(v)


@dataclass
class Annotation:
    """One patch: a reference (mode ``opt``) or a query (mode ``sar``).

    ``x``, ``y``: patch centre in metres (dataset CRS). ``bounds``: (minx, miny, maxx, maxy)
    metres. ``gsd``: metres per pixel. ``name``: the annotation file stem.
    """

    id: int
    x: float
    y: float
    file_path: str
    near_id: list[int] = field(default_factory=list)
    crs: str | None = None
    bounds: tuple[float, float, float, float] | None = None
    gsd: float | None = None
    aligned: bool | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def position_m(self) -> tuple[float, float]:
        return (self.x, self.y)

    def to_json(self) -> dict[str, Any]:
        """The annotation as written to disk (original keys first, extensions only if set)."""
        d: dict[str, Any] = {
            "id": int(self.id),
            "pos": {"x": float(self.x), "y": float(self.y)},
            "file_path": self.file_path,
            "near_id": [int(i) for i in self.near_id],
        }
        if self.crs is not None:
            d["crs"] = self.crs
        if self.bounds is not None:
            d["bounds"] = [float(b) for b in self.bounds]
        if self.gsd is not None:
            d["gsd"] = float(self.gsd)
        if self.aligned is not None:
            d["aligned"] = bool(self.aligned)
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, d: Any, source: str = "annotation") -> Annotation:
        """Parse and validate one annotation dict; errors name the file."""
        if not isinstance(d, dict):
            raise DataError(f"{source}: expected a JSON object")
        missing = [k for k in ("id", "pos", "file_path") if k not in d]
        if missing:
            raise DataError(f"{source}: missing key(s) {missing}")
        ident = _check_id(d["id"], source, "'id'")
        try:
            pos = d["pos"]
            if isinstance(pos, dict):
                x, y = _number(pos["x"], source, "'pos.x'"), _number(pos["y"], source, "'pos.y'")
            else:
                x, y = _number(pos[0], source, "'pos[0]'"), _number(pos[1], source, "'pos[1]'")
        except (TypeError, KeyError, IndexError):
            raise DataError(f"{source}: 'pos' must be {{\"x\": number, \"y\": number}}") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise DataError(f"{source}: 'pos' is not finite")
        fp = d["file_path"]
        if not isinstance(fp, str) or not fp:
            raise DataError(f"{source}: 'file_path' must be a non-empty string")
        if "\x00" in fp:
            raise DataError(f"{source}: 'file_path' {fp!r} contains a NUL byte; give the image's file name")
        near = d.get("near_id") or []
        if not isinstance(near, list):
            raise DataError(f"{source}: 'near_id' must be a list of ids")
        near_ids = [_check_id(v, source, f"'near_id[{k}]'") for k, v in enumerate(near)]
        bounds = d.get("bounds")
        if bounds is not None:
            if not (isinstance(bounds, list) and len(bounds) == 4):
                raise DataError(f"{source}: 'bounds' must be [minx, miny, maxx, maxy]")
            bounds = tuple(_number(b, source, "'bounds' entry") for b in bounds)
        gsd = d.get("gsd")
        aligned = d.get("aligned")
        if aligned is not None and not isinstance(aligned, bool):
            raise DataError(f"{source}: 'aligned' must be true or false, got {json.dumps(aligned)[:40]}")
        return cls(
            id=ident,
            x=x,
            y=y,
            file_path=fp,
            near_id=near_ids,
            crs=d.get("crs"),
            bounds=bounds,  # type: ignore[arg-type]
            gsd=_number(gsd, source, "'gsd'") if gsd is not None else None,
            aligned=aligned,
            extra={k: v for k, v in d.items() if k not in _KNOWN},
        )


def _stem_key(p: Path) -> tuple[int, int | str]:
    """Sort numeric stems numerically (SN6-CMPC names files 0.json, 1.json, ...)."""
    try:
        return (0, int(p.stem))
    except ValueError:
        return (1, p.stem)


def split_dir(root: str | os.PathLike[str], split: str) -> Path:
    return Path(root) / split


def safe_image_path(root: str | os.PathLike[str], split: str, mode: str, file_path: str) -> Path:
    """Resolve ``file_path`` inside ``ROOT/split/imgs/mode``; anything escaping it is rejected."""
    base = (Path(root) / split / "imgs" / mode).resolve()
    if "\x00" in file_path:
        raise DataError(f"file_path {file_path!r} contains a NUL byte; it must name an image in {split}/imgs/{mode}/")
    if os.path.isabs(file_path):
        raise DataError(f"file_path {file_path!r} is absolute; it must be relative to {split}/imgs/{mode}/")
    target = (base / file_path).resolve()
    if target != base and base not in target.parents:
        raise DataError(f"file_path {file_path!r} escapes {split}/imgs/{mode}/; refusing to read it")
    return target


def read_annotations(root: str | os.PathLike[str], split: str, mode: str) -> list[Annotation]:
    """Read every ``ROOT/split/annotations/mode/*.json`` (numeric order), validated.

    Raises :class:`DataError` for a missing folder, an empty folder, malformed JSON, a
    non-integer or out-of-range id, a ``file_path`` escaping the image folder, or (``opt``)
    two references sharing an id. ``near_id`` entries naming no optical reference of the
    split are reported once per split on stderr (:func:`check_near_ids`).
    """
    if split not in SPLITS or mode not in MODES:
        raise DataError(f"split must be one of {SPLITS} and mode one of {MODES}, got {split}/{mode}")
    adir = Path(root) / split / "annotations" / mode
    if not adir.is_dir():
        raise DataError(f"missing annotation folder {adir} (expected the CMPC layout ROOT/{{train,test}}/annotations/{{opt,sar}})")
    files = sorted(adir.glob("*.json"), key=_stem_key)
    if not files:
        raise DataError(f"no annotation files in {adir}")
    out: list[Annotation] = []
    for f in files:
        try:
            raw = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON in {f}: {e.msg} at line {e.lineno}") from None
        except UnicodeDecodeError:
            raise DataError(f"{f} is not UTF-8 JSON") from None
        ann = Annotation.from_json(raw, source=str(f))
        ann.name = f.stem
        try:
            safe_image_path(root, split, mode, ann.file_path)
        except DataError as e:
            raise DataError(f"{f}: {e}") from None
        out.append(ann)
    if mode == "opt":
        seen: dict[int, str] = {}
        for a in out:
            if a.id in seen:
                raise DataError(
                    f"duplicate optical reference id {a.id} in {adir}: {seen[a.id]}.json and {a.name}.json; "
                    f"each reference of a split needs its own id"
                )
            seen[a.id] = a.name
    check_near_ids(root, split, mode, out)
    return out


_NEAR_WARNED: set[tuple[str, str]] = set()
_REF_IDS: dict[tuple[str, int, int], set[int]] = {}  # (opt folder, mtime_ns, files) -> reference ids


def _ref_key(adir: Path) -> tuple[str, int, int] | None:
    try:
        return (str(adir.resolve()), adir.stat().st_mtime_ns, sum(1 for _ in adir.glob("*.json")))
    except OSError:
        return None


def _reference_ids(root: str | os.PathLike[str], split: str) -> set[int] | None:
    """Ids of the split's optical references (a light read of their ``id`` keys, cached per
    folder state), or None when the folder is absent or unreadable (the full read reports that)."""
    adir = Path(root) / split / "annotations" / "opt"
    if not adir.is_dir():
        return None
    key = _ref_key(adir)
    if key is not None and key in _REF_IDS:
        return _REF_IDS[key]
    out: set[int] = set()
    for f in adir.glob("*.json"):
        try:
            v = json.loads(f.read_text(encoding="utf-8")).get("id")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            out.add(v)
    if key is not None:
        _REF_IDS[key] = out
    return out


def check_near_ids(root: str | os.PathLike[str], split: str, mode: str, anns: list[Annotation]) -> int:
    """Count ``near_id`` entries of ``anns`` (one split/mode) that name no optical
    reference of the split; warn on stderr, once per split and dataset, when there are any.
    Returns the count (0 when nothing was checked)."""
    if not any(a.near_id for a in anns):
        return 0
    key = (str(Path(root).resolve()), split)
    if key in _NEAR_WARNED:
        return 0
    if mode == "opt":
        refs: set[int] | None = {a.id for a in anns}
        k = _ref_key(Path(root) / split / "annotations" / "opt")
        if k is not None:
            _REF_IDS[k] = refs  # type: ignore[assignment]
    else:
        refs = _reference_ids(root, split)
    if refs is None:
        return 0
    total = sum(len(a.near_id) for a in anns)
    bad = sum(1 for a in anns for i in a.near_id if i not in refs)
    if bad:
        _NEAR_WARNED.add(key)
        print(
            f"warning: {bad} of {total} near_id entries in {Path(root) / split / 'annotations' / mode} name no optical "
            f"reference of the {split} split; fix or regenerate them",
            file=sys.stderr,
        )
    return bad


def write_annotation(root: str | os.PathLike[str], split: str, mode: str, ann: Annotation) -> Path:
    """Write ``ann`` to ``ROOT/split/annotations/mode/<ann.name>.json`` (atomic)."""
    if not ann.name:
        raise ValueError("annotation has no name")
    safe_image_path(root, split, mode, ann.file_path)
    path = Path(root) / split / "annotations" / mode / f"{ann.name}.json"
    atomic_write_json(path, ann.to_json(), indent=None)
    return path


def read_dataset_meta(root: str | os.PathLike[str]) -> dict[str, Any]:
    """``ROOT/dataset.json`` written by the tiler, or {} (SN6-CMPC has none)."""
    p = Path(root) / "dataset.json"
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON in {p}: {e.msg}") from None
    return meta if isinstance(meta, dict) else {}


def check_root(root: str | os.PathLike[str]) -> Path:
    """A dataset root that exists and holds at least one split."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"dataset root not found: {r}")
    if not any((r / s / "annotations").is_dir() for s in SPLITS):
        raise DataError(f"{r} is not a CMPC dataset (no train/annotations or test/annotations)")
    return r


def positions(anns: list[Annotation]) -> np.ndarray:
    """(N, 2) float64 patch centres in metres."""
    return np.array([[a.x, a.y] for a in anns], dtype=np.float64).reshape(-1, 2)


def ids(anns: list[Annotation]) -> np.ndarray:
    """(N,) int64 location ids."""
    return np.array([a.id for a in anns], dtype=np.int64)
