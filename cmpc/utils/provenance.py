"""Provenance: which files an artefact was built from, and the one check before using it.

Every artefact records, under the key ``inputs``, the artefact files it was built from::

    "inputs": {"<role>": {"path": str, "sha256": hex}, "<role>": [{"path", "sha256"}, ...]}

``sha256`` is the SHA-256 of the file's bytes (:func:`cmpc.utils.io.file_sha256`, the same
identity as :func:`cmpc.models.checkpoint.checkpoint_hash` and an index manifest's
``checkpoint.hash``); ``path`` is where the file was at the time (informative only: the
hash is what is compared). An index is identified by the bytes of its ``manifest.json``.

Who writes what:

- embedder checkpoints (``cmpc train emb``): ``views`` (list: the translator checkpoints of
  ``translate.views``), ``init_weights`` (``model.weights``);
- refiner checkpoints (``cmpc train refine``): ``embedder``, ``index`` (the training-split
  index the graphs were built from), ``align_from`` (when the aligner was taken from another
  refiner);
- translator checkpoints (``cmpc translate train``): ``seg_opt`` / ``seg_sar`` (the
  segmentation judges of Seg-CycleGAN);
- index manifests: ``checkpoint`` = {path, hash} (the embedder; :mod:`cmpc.index.build`);
- reports (``metrics.json`` ``meta`` of ``cmpc test`` / ``cmpc localize``): ``embedder``,
  ``index``, ``refiner``; ``cmpc translate eval``: ``translator``, ``seg_*``,
  ``fid_embedder``; ``cmpc translate apply`` (``dataset.json``): ``translator``.

Consumers compare with :func:`check` before use; a mismatch is one line naming both hashes
(first 12 hex digits each) and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmpc.errors import CheckpointError, CmpcError
from cmpc.utils.io import file_sha256

#: the key under which an artefact lists its inputs
INPUTS = "inputs"


def short(h: str | None) -> str:
    """First 12 hex digits of a SHA-256, for messages ("?" when unknown)."""
    return (h or "?")[:12]


def record(path: str | os.PathLike[str], sha256: str | None = None) -> dict[str, str]:
    """``{"path", "sha256"}`` of the file at ``path`` (``sha256`` given: trusted, not recomputed)."""
    p = Path(path)
    if sha256 is None:
        if not p.is_file():
            raise CheckpointError(f"cannot record the provenance of {p}: file not found")
        sha256 = file_sha256(p)
    return {"path": str(p), "sha256": str(sha256)}


def recorded(artefact: Mapping[str, Any] | None, role: str) -> Any:
    """The record(s) ``artefact`` keeps for ``role`` (a dict, a list of dicts), or None."""
    if not isinstance(artefact, Mapping):
        return None
    inputs = artefact.get(INPUTS)
    return inputs.get(role) if isinstance(inputs, Mapping) else None


def _as_record(x: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, str | None]:
    if isinstance(x, Mapping):
        return {"path": x.get("path"), "sha256": x.get("sha256") or x.get("hash")}
    return record(x)


def check(
    expected: Mapping[str, Any] | str | None,
    actual: Mapping[str, Any] | str | os.PathLike[str],
    *,
    artefact: str,
    role: str,
    fix: str,
    error: type[CmpcError] = CheckpointError,
) -> None:
    """Refuse to use ``artefact`` with an ``actual`` input other than the one it was built from.

    ``expected``: the record ``artefact`` keeps for ``role`` (``{"path", "sha256"}``; the
    older ``{"path", "hash"}`` is read too) or a bare hex digest; None = the artefact records
    none (an older artefact): refused as well. ``actual``: the file about to be used, as a
    path (hashed here) or a record. Raises ``error`` with one line naming both hashes and
    ``fix``.
    """
    if expected is None or (isinstance(expected, Mapping) and not (expected.get("sha256") or expected.get("hash"))):
        raise error(f"{artefact} does not record the {role} it was built from (made by an older cmpc); {fix}")
    want = {"path": None, "sha256": expected} if isinstance(expected, str) else _as_record(expected)
    got = _as_record(actual)
    if want["sha256"] == got["sha256"]:
        return
    was = f" ({want['path']})" if want["path"] else ""
    raise error(
        f"{artefact} was built from {role} {short(want['sha256'])}{was} but the {role} in use "
        f"({got['path']}) is {short(got['sha256'])}; {fix}"
    )
