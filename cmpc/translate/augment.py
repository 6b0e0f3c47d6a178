"""Translated patches as extra training views for the embedder (``translate.views``).

A translator turns a location's SAR patch into pseudo-optical and its optical reference into
pseudo-SAR. In embedding training, with probability ``translate.view_prob`` a location's
optical view is replaced by pseudo-optical made from one of its aligned SAR queries, or its
SAR view by pseudo-SAR made from its optical reference (half the probability each when both
directions are available; several translators are drawn uniformly). The substituted view
goes through the same branch, augmentation and loss as the real one: the pair stays two
views of the same place, one of them in a style between the two sensors.

Two parts with small interfaces:

- :class:`TranslatedViews` (the view provider): for one split, every translator direction's
  output for every source patch, as model input (C, S, S) standardised like
  :func:`cmpc.data.patches.to_model_input`. With ``cache`` they are computed once into an
  HDF5 file per translator (``<runs_dir>/views/<translator hash>_<dataset key>.h5``, one
  dataset per direction, float16; reused only when its recorded ``translator_hash``, the
  SHA-256 of the checkpoint file, is the translator's) and read back lazily, so DataLoader
  workers share nothing but the file name.
- :func:`with_translated_views` (the trainer hook): takes the trainer's
  :class:`cmpc.data.pairs.PairDataset` and returns a copy whose optical/SAR patch loaders
  substitute translated views; validation keeps using the real patches.

The embedder trainer does not import this module: the CLI / pipeline passes
:func:`training_views` of the experiment as ``train_embedder(exp, views=...)``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from cmpc.config import Experiment
from cmpc.data.layout import Annotation, read_annotations, safe_image_path
from cmpc.data.patches import read_patch_array, to_model_input
from cmpc.errors import ConfigError
from cmpc.models.translators.base import direction_modes
from cmpc.translate.apply import LoadedTranslator, data_contract, load_translator
from cmpc.utils.io import atomic_path


def _dataset_key(root: str | os.PathLike[str], split: str, img_size: int, anns: dict[str, list[Annotation]]) -> str:
    names = [f"{m}:{a.name}:{a.file_path}" for m in ("sar", "opt") for a in anns[m]]
    h = hashlib.sha256(("\n".join([str(Path(root).resolve()), split, str(img_size)] + names)).encode()).hexdigest()
    return h[:12]


class TranslatedViews:
    """Translated views of one split: ``view(target, source_index, k)`` -> (C, S, S) float32.

    ``target`` "opt" gives pseudo-optical of SAR patch ``source_index`` (index into the
    split's SAR annotations); "sar" gives pseudo-SAR of optical patch ``source_index``.
    ``k`` picks among the translators offering that target (see :meth:`count`).
    """

    def __init__(
        self,
        checkpoints: list[str | os.PathLike[str]],
        root: str | os.PathLike[str],
        split: str,
        img_size: int,
        cache_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        if not checkpoints:
            raise ConfigError("translate.views is empty: name at least one translator checkpoint")
        self.root, self.split, self.img_size = Path(root), split, int(img_size)
        self.annotations = {m: read_annotations(root, split, m) for m in ("sar", "opt")}
        sar_ch, opt_ch, hw = data_contract(root, split)
        self.translators: list[LoadedTranslator] = []
        for c in checkpoints:
            tr = load_translator(c, device)
            tr.check_data(sar_ch, opt_ch, hw)
            self.translators.append(tr)
        # (translator index, direction) per target modality.
        self.offers: dict[str, list[tuple[int, str]]] = {"opt": [], "sar": []}
        for t, tr in enumerate(self.translators):
            for d in tr.directions:
                self.offers[direction_modes(d)[1]].append((t, d))
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.progress = progress
        self._key = _dataset_key(root, split, img_size, self.annotations)
        self._files: dict[int, Path] = {}
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        if self.cache_dir is not None:
            for t in range(len(self.translators)):
                self._files[t] = self._ensure_cache(t)

    def count(self, target: str) -> int:
        """Number of translator directions producing ``target`` views."""
        return len(self.offers[target])

    # ------------------------------------------------------------------ computing

    def _translate(self, t: int, direction: str, indices: list[int]) -> np.ndarray:
        """(len(indices), C, S, S) float32 model inputs of translator ``t`` on source patches."""
        src, _ = direction_modes(direction)
        anns = self.annotations[src]
        arrs = [read_patch_array(safe_image_path(self.root, self.split, src, anns[i].file_path)) for i in indices]
        outs = self.translators[t].translate_arrays(arrs, direction)
        return np.stack([to_model_input(o, self.img_size).numpy() for o in outs])

    def _ensure_cache(self, t: int) -> Path:
        import h5py

        tr = self.translators[t]
        path = self.cache_dir / f"{tr.hash[:16]}_{self._key}.h5"  # type: ignore[operator]
        if path.is_file():
            try:
                with h5py.File(path, "r") as h5:
                    # the file name holds 16 hex digits of the translator's SHA-256; the whole one is compared
                    same = h5.attrs.get("translator_hash") == tr.hash
                    if same and all(d in h5 and h5[d].shape[0] == len(self.annotations[direction_modes(d)[0]]) for d in tr.directions):
                        return path
            except OSError:
                pass  # unreadable (interrupted copy): rebuild it
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.attrs["translator"] = str(tr.path)
                h5.attrs["translator_hash"] = tr.hash
                h5.attrs["dataset"] = str(self.root)
                h5.attrs["split"] = self.split
                for d in tr.directions:
                    src, tgt = direction_modes(d)
                    n = len(self.annotations[src])
                    c = tr.channels(tgt)
                    ds = h5.create_dataset(d, shape=(n, c, self.img_size, self.img_size), dtype="float16", chunks=(1, c, self.img_size, self.img_size))
                    for s in tqdm(range(0, n, self.batch_size), desc=f"views {tr.model} {d}", disable=not self.progress, file=sys.stderr, leave=False):
                        idx = list(range(s, min(s + self.batch_size, n)))
                        ds[s : s + len(idx)] = self._translate(t, d, idx).astype(np.float16)
        return path

    # ------------------------------------------------------------------ reading

    def _h5(self, t: int) -> Any:
        import h5py

        if os.getpid() != self._pid:  # a forked DataLoader worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        if t not in self._handles:
            self._handles[t] = h5py.File(self._files[t], "r")
        return self._handles[t]

    def view(self, target: str, source_index: int, k: int = 0) -> torch.Tensor:
        """The ``k``-th ``target`` view of source patch ``source_index``: (C, S, S) float32."""
        t, d = self.offers[target][k]
        if self.cache_dir is None:
            return torch.from_numpy(self._translate(t, d, [source_index])[0])
        return torch.from_numpy(np.asarray(self._h5(t)[d][source_index], dtype=np.float32))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # h5py handles do not pickle (spawned workers reopen them)
        return state


class ViewSwapLoader:
    """Stands in for a :class:`~cmpc.data.patches.PatchDataset` inside a ``PairDataset``.

    ``load(i)`` returns the real patch ``i`` or, with probability ``prob``, a translated view
    of the same location from ``views``: ``sources[i]`` lists the source patches (indices in
    the other modality) whose translation shows patch ``i``'s location. The draw uses torch's
    global generator, which DataLoader seeds per worker from the run seed.
    """

    def __init__(self, base: Any, views: TranslatedViews, target: str, sources: list[list[int]], prob: float) -> None:
        self.base, self.views, self.target, self.sources, self.prob = base, views, target, sources, float(prob)
        self.swapped = 0

    def __getattr__(self, name: str) -> Any:  # annotations, cache, img_size, raw, ... of the real dataset
        if name == "base" or name.startswith("__"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def load(self, i: int) -> torch.Tensor:
        srcs = self.sources[i]
        n = self.views.count(self.target)
        if self.prob > 0 and srcs and n and float(torch.rand(())) < self.prob:
            j = srcs[int(torch.randint(len(srcs), ()))] if len(srcs) > 1 else srcs[0]
            k = int(torch.randint(n, ())) if n > 1 else 0
            self.swapped += 1
            return self.views.view(self.target, j, k)
        return self.base.load(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load(i), i


def _sources(opt: list[Annotation], sar: list[Annotation]) -> tuple[list[list[int]], list[list[int]]]:
    """(aligned SAR indices per optical patch, optical index per SAR patch), by location id."""
    row_of = {a.id: i for i, a in enumerate(opt)}
    sar_of_opt: list[list[int]] = [[] for _ in opt]
    opt_of_sar: list[list[int]] = [[] for _ in sar]
    for q, a in enumerate(sar):
        r = row_of.get(a.id)
        if r is None:
            continue
        opt_of_sar[q].append(r)
        if a.aligned is not False:  # pseudo-optical must show the reference's footprint
            sar_of_opt[r].append(q)
    return sar_of_opt, opt_of_sar


def with_translated_views(exp: Experiment, pairs: Any, split: str = "train", progress: bool = True) -> Any:
    """A copy of the trainer's ``PairDataset`` whose views are translated with ``translate.view_prob``.

    ``pairs.optical`` / ``pairs.sar`` must be :class:`~cmpc.data.patches.PatchDataset`-like
    (``annotations``, ``load(i)``) over ``split`` of ``exp.data.root``; the originals are left
    untouched for validation.
    """
    tc = exp.translate
    cache = Path(exp.runs_dir) / "views" if tc.cache_views else None
    from cmpc.utils.runtime import resolve_device

    device = resolve_device(exp.train.device)
    views = TranslatedViews(tc.views, exp.data.root, split, exp.data.img_size, cache_dir=cache, device=device, progress=progress)
    opt_anns, sar_anns = pairs.optical.annotations, pairs.sar.annotations
    if [a.name for a in opt_anns] != [a.name for a in views.annotations["opt"]] or [a.name for a in sar_anns] != [a.name for a in views.annotations["sar"]]:
        raise ConfigError("translated views must cover the same patches as the training pairs (use the full train split)")
    sar_of_opt, opt_of_sar = _sources(opt_anns, sar_anns)
    both = views.count("opt") > 0 and views.count("sar") > 0
    p = tc.view_prob / 2 if both else tc.view_prob
    out = copy.copy(pairs)
    out.optical = ViewSwapLoader(pairs.optical, views, "opt", sar_of_opt, p if views.count("opt") else 0.0)
    out.sar = ViewSwapLoader(pairs.sar, views, "sar", opt_of_sar, p if views.count("sar") else 0.0)
    out.translated_views = views
    print(
        f"[translate views] {len(views.translators)} translator(s): pseudo-optical x{views.count('opt')}, "
        f"pseudo-SAR x{views.count('sar')}, probability {tc.view_prob} per location",
        file=sys.stderr,
        flush=True,
    )
    return out


def training_views(exp: Experiment, split: str = "train") -> Callable[..., Any] | None:
    """What ``translate.views`` asks of the embedder trainer (its ``views`` argument): None
    when the list is empty, else ``views(pairs, progress=...)`` = :func:`with_translated_views`
    of ``exp`` on ``split``. The translators are loaded when the trainer calls it (after
    seeding), not here."""
    if not exp.translate.views:
        return None
    return functools.partial(with_translated_views, exp, split=split)
