"""The ``cmpc`` command line.

Every command takes an optional experiment file and ``--set section.key=value`` overrides.
User errors (:class:`~cmpc.errors.CmpcError`) print one line ``error: ...`` and exit 2.
Heavy modules are imported lazily so ``cmpc --help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from cmpc.errors import CmpcError, ConfigError, DataError


def _exp(args: argparse.Namespace, extra: list[str] | None = None):
    from cmpc.config import load_experiment

    return load_experiment(getattr(args, "experiment", None), list(args.set or []) + list(extra or []))


def _flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn explicit CLI flags into ``--set`` overrides (``None`` flags are skipped)."""
    out = []
    for attr, key in mapping.items():
        v = getattr(args, attr, None)
        if v is not None:
            out.append(f"{key}={json.dumps(v)}")
    return out


# --------------------------------------------------------------------------- handlers


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(_exp(args).to_dict(), indent=2))
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from cmpc.config import describe

    print(describe(args.section))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from cmpc.data.synth import generate_world

    exp = _exp(args, _flag_overrides(args, {"out": "synth.out", "seed": "synth.seed", "size_m": "synth.size_m", "gsd": "synth.gsd_m", "polarisations": "synth.polarisations", "looks": "synth.looks"}))
    info = generate_world(exp.synth, preview=not args.no_preview)
    print(json.dumps(info, indent=2))
    return 0


def cmd_data_tile(args: argparse.Namespace) -> int:
    from cmpc.data.tiler import tile_dataset

    exp = _exp(
        args,
        _flag_overrides(
            args,
            {
                "sar": "tile.sar",
                "optical": "tile.optical",
                "pairs": "tile.pairs",
                "out": "data.root",
                "patch_px": "tile.patch_px",
                "stride_px": "tile.stride_px",
                "split": "tile.split",
                "test_fraction": "tile.test_fraction",
                "non_aligned_per_ref": "tile.non_aligned_per_ref",
                "seed": "tile.seed",
                "sar_bands": "tile.sar_bands",
                "optical_bands": "tile.optical_bands",
                "crs": "tile.crs",
                "reproject": "tile.reproject",
                "register": "tile.register",
            },
        ),
    )
    summary = tile_dataset(exp)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_convert_s1(args: argparse.Namespace) -> int:
    from cmpc.data.sentinel import convert_s1

    facts = convert_s1(args.input, args.output, pol=args.pol, scale=args.scale, band=args.band, force=args.force)
    print(json.dumps(facts, indent=2))
    return 0


def cmd_data_convert_s2(args: argparse.Namespace) -> int:
    from cmpc.data.sentinel import convert_s2

    facts = convert_s2(args.input, args.output, bands=args.bands, level=args.level, dn_offset=args.dn_offset, saturation=args.saturation, force=args.force)
    print(json.dumps(facts, indent=2))
    return 0


def cmd_data_join(args: argparse.Namespace) -> int:
    from cmpc.data.join import join_rasters

    print(json.dumps(join_rasters(args.inputs, args.output, crs=args.crs, max_empty=args.max_empty), indent=2))
    return 0


def cmd_data_coregistration(args: argparse.Namespace) -> int:
    from cmpc.data.coregister import measure_pair, summarise
    from cmpc.data.mosaic import find_pairs
    from cmpc.utils.io import atomic_write_json

    if args.search < 1 or args.search > 64:
        raise ConfigError(f"--search must be 1-64 px, got {args.search}")
    if args.cells < 1 or args.cells > 16:
        raise ConfigError(f"--cells must be 1-16, got {args.cells}")
    if args.window < 4 * args.search or args.window > 4096:
        raise ConfigError(f"--window must be 4x --search ... 4096 px, got {args.window}")
    shift = None
    if args.method == "cfog":
        from cmpc.localize.register import cfog_shift

        def shift(a, b, search):  # noqa: ANN001, ANN202 (the ShiftFn signature)
            return cfog_shift(a, b, search, window=args.window)
    if args.optical is not None:
        jobs = [(Path(args.source).stem, Path(args.source), Path(args.optical))]
    else:
        jobs = [(p.name, p.sar, p.optical) for p in find_pairs(args.source)]
    pairs = []
    for name, sar, opt in jobs:
        r = measure_pair(sar, opt, search=args.search, cells=args.cells, name=name, shift=shift)
        pairs.append(r)
        e, n = r["content_offset_m"]
        spread = f", cells within {r['cell_spread_px']:.1f} px of it" if r["cell_spread_px"] is not None else ""
        edge = " (at the search edge: may be larger, raise --search)" if r["at_search_edge"] else ""
        print(f"{name}: SAR content {r['offset_m']:.1f} m from its grid place (east {e:+.1f}, north {n:+.1f}; "
              f"{math.hypot(*r['shift_px']):.2f} px at {r['gsd_m']:.2f} m/px){spread}{edge}", file=sys.stderr)
    how = (f"CFOG ZNCC of {args.window} px SAR windows, median of the windows with a clear peak (cmpc.localize.register)" if args.method == "cfog"
           else "mutual information (cmpc.data.coregister)")
    record = {"method": f"{how}, {args.search} px search, sub-pixel, the SAR on the optical grid",
              "summary": summarise(pairs), "pairs": pairs}
    if args.out:
        atomic_write_json(Path(args.out), record)
    print(json.dumps(record["summary"], indent=2))
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from cmpc.data.info import dataset_summary, format_summary

    summary = dataset_summary(args.root)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_train_emb(args: argparse.Namespace) -> int:
    from cmpc.train.emb import train_embedder
    from cmpc.translate.augment import training_views
    from cmpc.utils.runtime import configure_embedder_training

    exp = _exp(args)
    configure_embedder_training(exp.train.threads, exp.train.device)
    train_embedder(exp, views=training_views(exp))
    return 0


def cmd_train_refine(args: argparse.Namespace) -> int:
    from cmpc.index.build import ensure_train_index
    from cmpc.train.refine import train_refiner
    from cmpc.utils.runtime import set_torch_threads

    exp = _exp(args)
    set_torch_threads(exp.train.threads)
    checkpoint = getattr(args, "checkpoint", None)
    index = ensure_train_index(exp, checkpoint)  # the index step: the training map, built when missing or stale
    train_refiner(exp, index.directory, checkpoint=checkpoint)
    return 0


def cmd_train_all(args: argparse.Namespace) -> int:
    from cmpc.index.build import ensure_train_index
    from cmpc.train.emb import train_embedder
    from cmpc.train.refine import train_refiner
    from cmpc.translate.augment import training_views
    from cmpc.utils.runtime import configure_embedder_training, set_torch_threads

    exp = _exp(args)
    configure_embedder_training(exp.train.threads, exp.train.device)
    train_embedder(exp, views=training_views(exp))
    if exp.refine.enabled:
        set_torch_threads(exp.train.threads)
        train_refiner(exp, ensure_train_index(exp).directory)
    return 0


def _card_exp(args: argparse.Namespace, extra: list[str], name: str | None = None):
    """(experiment, card) of ``--model``: the card's configuration plus ``--set`` and flag
    overrides. The card's files are checked (size, SHA-256) before anything loads them; an
    experiment file or ``--checkpoint`` beside ``--model`` is refused (the card carries both)."""
    from cmpc.models.card import load_card

    if getattr(args, "experiment", None):
        raise ConfigError(f"give an experiment file or --model, not both: the model card of {args.model!r} carries the configuration")
    if getattr(args, "checkpoint", None):
        raise ConfigError("--checkpoint and --model exclude each other: the model card names its embedder")
    card = load_card(args.model)
    return card.to_experiment(list(args.set or []) + list(extra), name=name), card


def _need_experiment(args: argparse.Namespace, command: str) -> None:
    if not getattr(args, "experiment", None):
        raise ConfigError(f"cmpc {command} needs an experiment file or --model NAME (a shipped model, e.g. --model sentinel)")


def _index_dir_arg(value: str) -> Path:
    """``--index``: a name under ``index/`` (when ``index/<name>/`` exists or no folder of that
    name is here) or the path of an index folder."""
    from cmpc.config import validate_index_name

    p = Path(value)
    if "/" not in value and os.sep not in value:
        named = Path("index") / validate_index_name(value, "--index")
        if named.is_dir() or not p.is_dir():
            return named
    return p


def cmd_index_build(args: argparse.Namespace) -> int:
    from cmpc.index.build import build_index

    overrides = _flag_overrides(args, {"name": "index.name", "factory": "index.factory", "split": "index.split", "raster": "index.raster",
                                       "patch_px": "index.patch_px", "stride_px": "index.stride_px", "shards": "index.shards",
                                       "engine": "index.engine", "uri": "index.uri", "dask": "index.dask", "dask_workers": "index.dask_workers"})
    if args.model:
        import dataclasses

        from cmpc.data.conventions import check_map_sources

        exp, card = _card_exp(args, overrides)
        facts = check_map_sources(card.inputs, raster=exp.index.raster, bands=exp.index.bands, root=exp.data.root, split=exp.index.split)
        if exp.index.raster and exp.index.patch_px is None:  # references cover the ground the model was trained on
            exp = dataclasses.replace(exp, index=dataclasses.replace(exp.index, patch_px=card.inputs.patch_px(facts["gsd_m"])))
            if exp.index.stride_px is None:  # ...at the card's reference spacing on the ground
                exp = dataclasses.replace(exp, index=dataclasses.replace(exp.index, stride_px=card.inputs.stride_px(facts["gsd_m"])))
        manifest = build_index(exp, checkpoint=str(card.embedder.path), add=args.add)
    else:
        _need_experiment(args, "index build")
        exp = _exp(args, overrides)
        manifest = build_index(exp, checkpoint=args.checkpoint, add=args.add)
    print(json.dumps(manifest, indent=2))
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from cmpc.index.store import read_manifest

    print(json.dumps(read_manifest(args.path), indent=2))
    return 0


def cmd_localize(args: argparse.Namespace) -> int:
    from cmpc.evaluate.ranks import GroundTruthScorer
    from cmpc.localize.localizer import NO_REFINER_FILE
    from cmpc.localize.run import localize

    overrides = _flag_overrides(args, {"top_k": "localize.top_k", "prior": "localize.prior", "center": "localize.prior_center",
                                       "radius": "localize.prior_radius_m"})
    index_dir = _index_dir_arg(args.index) if args.index else None
    if args.model:
        # named after the index: reports/<index name>/localize unless --out
        exp, card = _card_exp(args, overrides, name=index_dir.name if index_dir is not None else None)
        result = localize(exp, queries=args.queries, out=args.out, checkpoint=str(card.embedder.path), split=args.split,
                          index_dir=index_dir if index_dir is not None else exp.index_dir,
                          scorer=GroundTruthScorer(exp.eval, exp.localize.top_k),
                          refiner_path=card.refiner.path if card.refiner else NO_REFINER_FILE,
                          use_refiner=card.refiner is not None or (exp.refine.enabled and exp.refine.aligner == "cfog"),
                          conventions=card.inputs)
    else:
        _need_experiment(args, "localize")
        exp = _exp(args, overrides)
        # queries with ground truth are scored too (metrics.json + plots beside the predictions)
        result = localize(exp, queries=args.queries, out=args.out, checkpoint=args.checkpoint, split=args.split, index_dir=index_dir,
                          scorer=GroundTruthScorer(exp.eval, exp.localize.top_k))
    print(json.dumps(result, indent=2))
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from cmpc.models.card import card_summary, load_card

    card = load_card(args.model, verify=False)
    summary = card_summary(card)
    if args.verify:
        card.verify()
        summary["verified"] = True
    print(json.dumps(summary, indent=2))
    return 0


def cmd_model_seal(args: argparse.Namespace) -> int:
    from cmpc.models.card import seal_card

    raw = seal_card(args.model)
    print(json.dumps(raw["files"], indent=2))
    return 0


def cmd_model_fuse(args: argparse.Namespace) -> int:
    from cmpc.models.checkpoint import checkpoint_hash, fuse_checkpoints

    out = fuse_checkpoints(args.out, args.checkpoints, args.weights)
    print(json.dumps({"checkpoint": str(out), "sha256": checkpoint_hash(out), "members": [str(p) for p in args.checkpoints]}))
    return 0


def cmd_model_aligner(args: argparse.Namespace) -> int:
    from cmpc.localize.refine import aligner_payload, save_refiner
    from cmpc.models.checkpoint import checkpoint_hash

    out = save_refiner(args.out, aligner_payload(args.refiner))
    print(json.dumps({"checkpoint": str(out), "sha256": checkpoint_hash(out), "from": str(args.refiner)}))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from cmpc.evaluate.run import evaluate
    from cmpc.index.build import ensure_index

    exp = _exp(args)
    index = ensure_index(exp, args.checkpoint)  # the index step: built only when missing or stale
    metrics = evaluate(exp, index.directory, checkpoint=args.checkpoint, index_rebuilt=index.built)
    print(json.dumps({k: v for k, v in metrics.items() if k != "meta"}, indent=2))
    return 0


def cmd_eval_pairs(args: argparse.Namespace) -> int:
    from cmpc.evaluate.pairs import run_pairs_eval
    from cmpc.models.checkpoint import default_checkpoint

    exp = _exp(args)
    res = run_pairs_eval(default_checkpoint(exp.run_dir, args.checkpoint), exp.report_dir, pairs=args.pairs, root=args.root,
                         fit=args.fit, sar_scale=args.sar_scale, sar_bands=args.sar_bands)
    print(json.dumps({k: v for k, v in res.items() if k not in ("ranks", "pairs", "meta")}, indent=2))
    return 0


def _scene_settings(args: argparse.Namespace):
    from cmpc.localize.scene import SceneSettings

    kw = {}
    if getattr(args, "rotation_range", None) is not None:
        kw["rotation_range_deg"] = float(args.rotation_range)
    if getattr(args, "top_k", None) is not None:
        kw["top_k"] = int(args.top_k)
    if getattr(args, "dense_search", None) is not None:
        kw["dense_search"] = int(args.dense_search)
    s = SceneSettings(**kw)
    s.check()
    return s


def _georeferencer(args: argparse.Namespace, command: str):  # noqa: ANN202 - (Experiment, Georeferencer)
    """(experiment, georeferencer) of ``cmpc georef`` / ``cmpc eval scenes``: an experiment
    file or ``--model`` (a shipped card: its embedder, and its refiner when it ships one),
    on ``--index`` (default the experiment's serving index)."""
    from cmpc.localize.georef import georeferencer_from_experiment

    index_dir = _index_dir_arg(args.index) if getattr(args, "index", None) else None
    scene_dir = Path(args.scene_model) if getattr(args, "scene_model", None) else None
    if scene_dir is not None and not scene_dir.is_dir():
        raise ConfigError(f"--scene-model {scene_dir} is not a folder (it holds scene_decision.json / scene_graph.pt from `cmpc train scene --out`)")
    settings = _scene_settings(args)
    if getattr(args, "model", None):
        if index_dir is None:
            raise ConfigError(f"cmpc {command} --model needs --index NAME (an index built with `cmpc index build --model {args.model} --raster MAP.tif --name NAME`)")
        exp, card = _card_exp(args, [], name=index_dir.name)
        from_card = scene_dir is None and card.scene_decision is not None
        if from_card:  # the card's calibrated decision and, when it lists one, its GNN (sha256 checked with the card)
            scene_dir = card.scene_decision.path.parent
        refiner = card.refiner
        if refiner is None and card.aligner is not None:  # a dense descriptor alone: fine alignment for scenes, nothing else
            refiner = card.aligner
            exp = dataclasses.replace(exp, refine=dataclasses.replace(exp.refine, enabled=True, rerank=False, gnn_position=False,
                                                                      fine_align=False, gate="config", align_min_peak=None,
                                                                      aligner="learned", align_score="corr"))
        geo = georeferencer_from_experiment(exp, settings, checkpoint=str(card.embedder.path), index_dir=index_dir,
                                            refiner_path=refiner.path if refiner else None, use_refiner=refiner is not None,
                                            scene_dir=scene_dir, use_scene_top_k=args.top_k is None,
                                            use_scene_dense=getattr(args, "dense_search", None) is None,
                                            use_scene_graph=not from_card or card.scene_graph is not None)
        geo.conventions = card.inputs  # scenes are checked against what the model was trained on
        if from_card and card.scene_graph is None:
            geo.gnn_error = f"model card {card.path} ships no scene-graph GNN (files.scene_graph); use --method verify, or --scene-model DIR with one"
        return exp, geo
    _need_experiment(args, command)
    exp = _exp(args)
    return exp, georeferencer_from_experiment(exp, settings, checkpoint=args.checkpoint, index_dir=index_dir, scene_dir=scene_dir,
                                              use_scene_top_k=args.top_k is None, use_scene_dense=getattr(args, "dense_search", None) is None)


def cmd_georef(args: argparse.Namespace) -> int:
    from cmpc.localize.georef import write_answer
    from cmpc.localize.scene import read_scene

    if args.center is not None and args.radius is None:
        raise ConfigError("--center X Y needs --radius M (a prior disc in the map CRS)")
    if args.radius is not None and args.radius <= 0:
        raise ConfigError(f"--radius must be positive metres, got {args.radius:g}")
    exp, geo = _georeferencer(args, "georef")
    if args.center is None and args.radius is not None:  # the radius of the prior around the file's own georeferencing
        geo.settings = dataclasses.replace(geo.settings, own_prior_radius_m=float(args.radius))
        if geo.gnn_settings is not None:
            geo.gnn_settings = dataclasses.replace(geo.gnn_settings, own_prior_radius_m=float(args.radius))
    scene = read_scene(args.scene, gsd_m=args.gsd, bands=exp.localize.raster_bands, map_crs=geo.localizer.index.crs)
    if geo.conventions is not None:
        from cmpc.data.conventions import check_sar_scene

        check_sar_scene(args.scene, geo.conventions, gsd_m=args.gsd, bands=exp.localize.raster_bands)
    method = args.method or geo.default_method
    ans = geo.locate(scene, center=args.center, radius_m=args.radius, methods=(method,))[method]
    out = Path(args.out) if args.out else exp.report_dir / "georef" / Path(args.scene).stem
    write_answer(out, ans, scene, geo)
    summary = {"status": ans.status, "out": str(out), "inliers": ans.inlier_tiles, "tiles": ans.n_tiles, "confidence": ans.confidence}
    if ans.transform is not None:
        c = ans.transform.centre(scene.width, scene.height)
        summary.update({"center_x": round(float(c[0]), 2), "center_y": round(float(c[1]), 2), "heading_deg": round(ans.transform.heading_deg, 2),
                        "scale": round(ans.transform.scale, 5)})
    print(json.dumps(summary, indent=2))
    if not ans.found:
        prior = ans.stats.get("prior") or {}
        hint = ""
        if prior.get("radius_m"):  # the search was held to a disc: the scene may lie outside it
            whose = "the given --center" if args.center is not None else "the file's own georeferencing"
            hint = f"; searched only within {float(prior['radius_m']):.0f} m of {whose} (--radius M widens it)"
        print(f"not found: {ans.reason}{hint} (best guess and details in {out}/result.json)", file=sys.stderr)
    return 0


def cmd_data_scenes(args: argparse.Namespace) -> int:
    from cmpc.data.scenes import cut_scenes, load_box_shifts, load_boxes, world_sar

    exp = _exp(args)
    out = Path(args.out) if args.out else Path("data") / exp.name / f"scenes_{args.split}_{args.tiles}x{args.tiles}_h{args.heading_range:g}"
    sar = Path(args.sar) if args.sar else world_sar(exp.synth.out, exp.data.root)
    if not sar.exists():
        raise DataError(f"--sar {sar} does not exist")
    boxes = load_boxes(args.areas, args.split) if args.areas else None
    extra = {"experiment": exp.name} | ({"areas": str(args.areas)} if args.areas else {})
    rec = cut_scenes(sar, exp.data.root, out, args.split, args.tiles, args.count,
                     args.heading_range, args.seed, bands=exp.localize.raster_bands, extra=extra, boxes=boxes,
                     box_shifts=load_box_shifts(args.areas) if args.areas else None)
    print(json.dumps({k: v for k, v in rec.items() if k != "scenes"} | {"out": str(out)}, indent=2))
    return 0


def cmd_eval_scenes(args: argparse.Namespace) -> int:
    from cmpc.evaluate.scenes import evaluate_scenes, redecide_scenes

    if bool(args.scenes) == bool(args.redecide):
        raise ConfigError("cmpc eval scenes needs --scenes FOLDER (answer the scenes) or --redecide REPORT (decide earlier answers again), not both")
    exp, geo = _georeferencer(args, "eval scenes")
    if args.redecide:
        if not args.out:
            raise ConfigError("--redecide needs --out FOLDER (the report it reads is kept)")
        rec = redecide_scenes(geo, args.redecide, Path(args.out))
        print(json.dumps(rec["rows"], indent=2))
        return 0
    if geo.conventions is not None:  # the folder's scenes are cut alike: its first one is checked
        from cmpc.data.conventions import check_sar_scene
        from cmpc.evaluate.scenes import list_scenes

        first, truth = list_scenes(args.scenes)[0]
        check_sar_scene(first, geo.conventions, gsd_m=float(truth["gsd_m"]) * args.gsd_factor, bands=exp.localize.raster_bands)
    out = Path(args.out) if args.out else exp.report_dir / "scenes" / Path(args.scenes).name
    rec = evaluate_scenes(geo, args.scenes, out, methods=tuple(args.methods), meta={"experiment": exp.name}, gsd_factor=args.gsd_factor)
    print(json.dumps(rec["rows"], indent=2))
    return 0


def cmd_train_scene(args: argparse.Namespace) -> int:
    from cmpc.data.scenes import SceneSource
    from cmpc.index.build import ensure_train_index
    from cmpc.train.scene import calibrate

    exp = _exp(args)
    if args.rechoose:
        from cmpc.train.scene import rechoose

        print(json.dumps(rechoose(Path(args.out) if args.out else Path(exp.run_dir)), indent=2))
        return 0
    if args.keep_gnn and args.no_gnn:
        raise ConfigError("--keep-gnn and --no-gnn contradict each other")
    from cmpc.localize.scene import SceneSettings

    tiling = {"min_scene_tiles": SceneSettings.min_scene_tiles if args.min_tiles is None else args.min_tiles,
              "max_dense_tiles": SceneSettings.max_dense_tiles if args.max_dense_tiles is None else args.max_dense_tiles}
    if min(tiling.values()) < 0:
        raise ConfigError("--min-tiles / --max-dense-tiles must be >= 0 (0 = off)")
    if not (args.no_gnn or args.keep_gnn) and tiling != {"min_scene_tiles": SceneSettings.min_scene_tiles, "max_dense_tiles": SceneSettings.max_dense_tiles}:
        raise ConfigError("--min-tiles / --max-dense-tiles go with --keep-gnn or --no-gnn (the GNN is trained with the default tiling)")
    if (args.sar or args.areas or args.index) and not (args.sar and args.areas and args.index):
        raise ConfigError("--sar, --areas and --index go together: a calibration map's SAR raster, its area boxes and the index of its optical raster")
    if args.sar:
        source = SceneSource.of_files(args.sar, args.areas, "train")
        index_dir = _index_dir_arg(args.index)
        if not (index_dir / "manifest.json").is_file():
            raise DataError(f"--index {args.index}: no index at {index_dir} (build it with `cmpc index build EXP --raster OPTICAL.tif --name NAME`)")
    else:
        source = None
        index_dir = ensure_train_index(exp, args.checkpoint).directory  # the index step: the training map, built only when missing or stale
    out = Path(args.out) if args.out else None
    if args.no_gnn:
        rec = calibrate(exp, index_dir, tiles=tuple(args.tiles), count=args.count, heading_ranges=tuple(args.heading_ranges), checkpoint=args.checkpoint,
                        source=source, out_dir=out, top_k=args.top_k, negatives=args.negatives, **tiling)
    elif args.keep_gnn:
        from cmpc.train.scene import calibrate_keeping_gnn

        rec = calibrate_keeping_gnn(exp, index_dir, tiles=tuple(args.tiles), count=args.count, heading_ranges=tuple(args.heading_ranges),
                                    checkpoint=args.checkpoint, source=source, out_dir=out, top_k=args.top_k, negatives=args.negatives, **tiling)
    else:
        from cmpc.train.scene import train_and_calibrate

        rec = train_and_calibrate(exp, index_dir, tiles=tuple(args.tiles), count=args.count, heading_ranges=tuple(args.heading_ranges),
                                  checkpoint=args.checkpoint, gnn_count=args.gnn_count, gnn_epochs=args.gnn_epochs, source=source, out_dir=out,
                                  top_k=args.top_k, negatives=args.negatives)
    print(json.dumps(rec, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cmpc.pipeline import run_demo

    run_demo(_exp(args), fresh=args.fresh)
    return 0


def cmd_translate_train(args: argparse.Namespace) -> int:
    from cmpc.translate.train import train_translator
    from cmpc.utils.runtime import set_torch_threads

    exp = _exp(args, _flag_overrides(args, {"model": "translate.model", "direction": "translate.direction", "epochs": "translate.epochs"}))
    set_torch_threads(exp.translate.threads)
    print(json.dumps({"checkpoint": str(train_translator(exp))}))
    return 0


def cmd_translate_seg(args: argparse.Namespace) -> int:
    from cmpc.translate.segment import load_segmenter, train_segmenter
    from cmpc.utils.runtime import set_torch_threads

    exp = _exp(args)
    set_torch_threads(exp.translate.threads)
    out = {}
    for mode in args.modality:
        path = train_segmenter(exp, mode, force=args.force)
        out[mode] = {"checkpoint": str(path), **load_segmenter(path)[1].get("metrics", {})}
    print(json.dumps(out, indent=2))
    return 0


def cmd_translate_apply(args: argparse.Namespace) -> int:
    from cmpc.translate.apply import apply_translator

    exp = _exp(args)
    print(json.dumps(apply_translator(exp, args.checkpoint, split=args.split, direction=args.direction, out=args.out), indent=2))
    return 0


def cmd_translate_eval(args: argparse.Namespace) -> int:
    from cmpc.translate.evaluate import evaluate_translator
    from cmpc.utils.runtime import set_torch_threads

    exp = _exp(args)
    set_torch_threads(exp.translate.threads)
    res = evaluate_translator(exp, args.checkpoint, split=args.split, out=args.out)
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=2))
    return 0


def cmd_translate_select(args: argparse.Namespace) -> int:
    from cmpc.translate.select import select_checkpoint
    from cmpc.utils.runtime import configure_embedder_training

    exp = _exp(args)
    configure_embedder_training(exp.train.threads, exp.train.device)  # it trains short embedder runs
    print(json.dumps(select_checkpoint(exp, candidates=args.checkpoints or None), indent=2))
    return 0


def cmd_translate_ensemble(args: argparse.Namespace) -> int:
    from cmpc.translate.ensemble import run_ensemble
    from cmpc.utils.runtime import set_torch_threads

    exp = _exp(args)
    set_torch_threads(exp.translate.threads)
    res = run_ensemble(exp, members=args.members or None, trials=args.trials, references=args.references)
    print(json.dumps({k: v for k, v in res.items() if k not in ("meta",)}, indent=2))
    return 0


# --------------------------------------------------------------------------- parser


def _add_common(p: argparse.ArgumentParser, experiment: str = "optional") -> None:
    if experiment == "required":
        p.add_argument("experiment", help="experiment JSON file (experiments/*.json)")
    elif experiment == "optional":
        p.add_argument("experiment", nargs="?", default=None, help="experiment JSON file (optional)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from cmpc import __version__

    parser = argparse.ArgumentParser(prog="cmpc", description="SAR -> optical geo-localization.")
    parser.add_argument("--version", action="version", version=f"cmpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # config
    p_cfg = sub.add_parser("config", help="show a resolved experiment or the list of keys")
    s_cfg = p_cfg.add_subparsers(dest="sub", required=True)
    p = s_cfg.add_parser("show", help="print the resolved experiment")
    _add_common(p)
    p.set_defaults(func=cmd_config_show)
    p = s_cfg.add_parser("keys", help="list config keys, defaults and docs")
    p.add_argument("section", nargs="?", default=None)
    p.set_defaults(func=cmd_config_keys)

    # data
    p_data = sub.add_parser("data", help="synthetic world, tiling, dataset info")
    s_data = p_data.add_subparsers(dest="sub", required=True)
    p = s_data.add_parser("synth", help="generate a synthetic SAR/optical world")
    _add_common(p)
    p.add_argument("--out", help="output folder")
    p.add_argument("--seed", type=int)
    p.add_argument("--size-m", dest="size_m", type=float, help="world side, metres")
    p.add_argument("--gsd", type=float, help="metres per pixel")
    p.add_argument("--polarisations", type=int, choices=(1, 2, 4))
    p.add_argument("--looks", type=int, help="speckle looks L")
    p.add_argument("--no-preview", action="store_true", help="skip the side-by-side PNG")
    p.set_defaults(func=cmd_data_synth)

    p = s_data.add_parser("tile", help="cut co-registered SAR + optical GeoTIFFs into a CMPC dataset")
    _add_common(p)
    p.add_argument("--sar", help="SAR GeoTIFF")
    p.add_argument("--optical", help="optical GeoTIFF")
    p.add_argument("--pairs", help="instead of --sar/--optical: a folder of NAME_sar.tif / NAME_optical.tif pairs, or a JSON/CSV list of pairs (touching pairs are tiled as one map)")
    p.add_argument("--out", help="dataset root to write")
    p.add_argument("--patch-px", dest="patch_px", type=int)
    p.add_argument("--stride-px", dest="stride_px", type=int)
    p.add_argument("--split", choices=("cross-area", "same-area"))
    p.add_argument("--test-fraction", dest="test_fraction", type=float)
    p.add_argument("--non-aligned-per-ref", dest="non_aligned_per_ref", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--sar-bands", dest="sar_bands", type=int, nargs="+", metavar="B", help="1-based SAR bands to keep")
    p.add_argument("--optical-bands", dest="optical_bands", type=int, nargs="+", metavar="B", help="1-based optical bands to keep")
    p.add_argument("--crs", help="dataset CRS (default: the optical CRS when in metres with scale factor within 0.002 of 1 at the data centre, else its local UTM zone)")
    p.add_argument("--reproject", action="store_true", default=None, help="warp the SAR raster to the optical CRS when they differ")
    p.add_argument("--register", metavar="RECORD", help="move each SAR file by its offset in this co-registration record (`cmpc data coregistration --out RECORD`) before tiling")
    p.set_defaults(func=cmd_data_tile)

    p = s_data.add_parser("scenes", help="cut SAR scenes of N x N tiles with known answers (no georeferencing + truth.json)")
    _add_common(p, "required")
    p.add_argument("--split", choices=("train", "test"), default="test", help="area the scenes lie in")
    p.add_argument("--tiles", type=int, default=3, help="N: scenes of N x N query tiles ((N+1)/2 tile widths)")
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--heading-range", dest="heading_range", type=float, default=0.0, help="headings drawn within +-DEG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sar", help="SAR raster (or folder of SAR/optical pairs) to cut from (default: the experiment's world or dataset source)")
    p.add_argument("--areas", help="JSON of area boxes the scenes must lie in (a list of [minx, miny, maxx, maxy], a benchmarks.mosaic "
                   "mosaic.json: one box per world, or a dataset.json: its --split boxes); default the dataset's --split area")
    p.add_argument("--out", help="output folder (default data/<name>/scenes_<split>_<N>x<N>_h<DEG>)")
    p.set_defaults(func=cmd_data_scenes)

    p = s_data.add_parser("convert-s1", help="Sentinel-1 GRD (amplitude, linear power or dB) -> sentinel-la SAR convention (VH uint8, amplitude / p99)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--pol", default="VH", choices=("VH", "VV", "HV", "HH"), help="polarisation wanted (refused when the file says another; default VH, what sentinel-la models are trained on)")
    p.add_argument("--scale", default="auto", choices=("auto", "amplitude", "linear", "intensity", "db"), help="input values: GRD amplitude, linear power (= intensity), dB; auto detects (negative values = dB)")
    p.add_argument("--band", type=int, help="1-based band of a multi-band input (default: the band named --pol)")
    p.add_argument("--force", action="store_true", help="turn refusals (wrong polarisation, dB/linear mismatch, GSD far from 8.3 m, 8-bit input) into warnings")
    p.set_defaults(func=cmd_data_convert_s1)

    p = s_data.add_parser("convert-s2", help="Sentinel-2 L1C/L2A (digital numbers or reflectance, any band order) -> sentinel-la optical convention (B04,B03,B02 uint8)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--bands", help="names of the input's bands in file order, e.g. B02,B03,B04,B08 (default: the band descriptions)")
    p.add_argument("--level", default="L1C", choices=("L1C", "L2A"), help="product level (L2A is converted with a domain-shift warning)")
    p.add_argument("--dn-offset", dest="dn_offset", type=float, default=0.0, help="subtracted from digital numbers before / 10000: 1000 for processing baseline 04.00+ (products from 2022-01-25)")
    p.add_argument("--saturation", type=float, default=0.2, help="reflectance written as 255 (sentinel-la: 0.2)")
    p.add_argument("--force", action="store_true", help="turn refusals (8-bit input, GSD far from 8.3 m, not digital numbers) into warnings")
    p.set_defaults(func=cmd_data_convert_s2)

    p = s_data.add_parser("join", help="several map rasters (e.g. Sentinel-2 tiles) -> one GeoTIFF to index (windowed; the first file wins where they overlap)")
    p.add_argument("output", help="the GeoTIFF to write (atomically)")
    p.add_argument("inputs", nargs="+", help="two or more rasters of the same bands and data type")
    p.add_argument("--crs", help="target CRS (default the first file's; files in others are warped onto it)")
    p.add_argument("--max-empty", dest="max_empty", type=float, default=0.5, help="refuse when more than this fraction of the joint extent would be empty (default 0.5)")
    p.set_defaults(func=cmd_data_join)

    p = s_data.add_parser("coregistration", help="measure how far SAR / optical pairs are off each other (mutual information or CFOG), before training on them")
    p.add_argument("source", help="a folder (or JSON/CSV list) of NAME_sar.tif / NAME_optical.tif pairs, or one SAR raster with OPTICAL")
    p.add_argument("optical", nargs="?", help="the optical raster when SOURCE is one SAR raster")
    p.add_argument("--search", type=int, default=6, help="shifts searched, +-px of the optical grid (default 6)")
    p.add_argument("--cells", type=int, default=2, help="also measure each of CELLS x CELLS blocks (their spread says how far to trust the number; default 2)")
    p.add_argument("--method", choices=("mi", "cfog"), default="mi",
                   help="mi: mutual information of the raw pixels (default); cfog: dense CFOG alignment of many SAR windows, median shift (steadier across sensors; the fine aligner's own descriptor)")
    p.add_argument("--window", type=int, default=128, help="--method cfog: SAR window side, px (default 128)")
    p.add_argument("--out", help="JSON file for every pair's numbers (written atomically)")
    p.set_defaults(func=cmd_data_coregistration)

    p = s_data.add_parser("info", help="summarise a CMPC dataset")
    p.add_argument("root")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_info)

    # train
    p_train = sub.add_parser("train", help="train the embedder and/or the refiner")
    s_train = p_train.add_subparsers(dest="sub", required=True)
    for name, func, hlp in (
        ("emb", cmd_train_emb, "embedding network"),
        ("refine", cmd_train_refine, "scene-graph refiner"),
        ("all", cmd_train_all, "embedding then refinement"),
    ):
        p = s_train.add_parser(name, help=hlp)
        _add_common(p, "required")
        if name == "refine":
            p.add_argument("--checkpoint", help="embedder checkpoint (default: runs/<name>/emb_best.pt)")
        p.set_defaults(func=func)
    p = s_train.add_parser("scene", help="train the scene-graph GNN and calibrate the scene decision rule on training-area scenes -> runs/<name>/scene_graph.pt, scene_decision.json")
    _add_common(p, "required")
    p.add_argument("--checkpoint", help="embedder checkpoint (default: runs/<name>/emb_best.pt)")
    p.add_argument("--tiles", type=int, nargs="+", default=[2, 3], help="scene sizes (N x N tiles) to calibrate on")
    p.add_argument("--count", type=int, default=30, help="scenes per size and heading range")
    p.add_argument("--negatives", type=int, help="off-map scenes (mirrored copies) per size and heading range, every claim of one false (default: half of --count; 0 = none)")
    p.add_argument("--heading-ranges", dest="heading_ranges", type=float, nargs="+", default=[0.0, 15.0],
                   help="heading ranges (+-DEG) of the validation scenes; rotated ones are searched with that rotation range")
    p.add_argument("--no-gnn", dest="no_gnn", action="store_true", help="only calibrate the verify rule (no scene-graph GNN)")
    p.add_argument("--keep-gnn", dest="keep_gnn", action="store_true",
                   help="calibrate with the scene-graph GNN already in the output folder (not retrained; its default-method record is kept)")
    p.add_argument("--min-tiles", dest="min_tiles", type=int,
                   help="tile scenes with fewer tiles than this at half the reference stride (default 64; 0 = off); recorded with the decision")
    p.add_argument("--max-dense-tiles", dest="max_dense_tiles", type=int,
                   help="...and any scene whose half-stride tiles over all headings fit this budget (default 1000; 0 = off); recorded with the decision")
    p.add_argument("--rechoose", action="store_true",
                   help="choose the decision again from the saved scene_calibration.csv (no scene is answered; other records kept)")
    p.add_argument("--sar", help="cut the scenes from this SAR raster (a calibration map of other places) instead of the training area; needs --areas and --index")
    p.add_argument("--areas", help="JSON of the boxes the scenes lie in (see `cmpc data scenes --areas`)")
    p.add_argument("--index", help="index of the calibration map's optical raster (name under index/ or folder)")
    p.add_argument("--out", help="folder for scene_decision.json and scene_graph.pt (default runs/<name>); georef reads it with --scene-model")
    p.add_argument("--top-k", dest="top_k", type=int, default=20, help="candidates per tile, recorded with the rule (georef uses it by default)")
    p.add_argument("--gnn-count", dest="gnn_count", type=int, default=40, help="GNN scenes cut per size (2, 3, 4) and heading range")
    p.add_argument("--gnn-epochs", dest="gnn_epochs", type=int, default=40, help="GNN training epochs (the best validation one is kept)")
    p.set_defaults(func=cmd_train_scene)

    # index
    p_idx = sub.add_parser("index", help="build or inspect a reference index")
    s_idx = p_idx.add_subparsers(dest="sub", required=True)
    p = s_idx.add_parser("build", help="embed optical references into index/<name>/")
    _add_common(p)
    p.add_argument("--model", help="a shipped model instead of the experiment file: a registered name (weights/<NAME>/, or $CMPC_WEIGHTS) or a card.json path")
    p.add_argument("--checkpoint", help="embedder checkpoint (default: runs/<name>/emb_best.pt)")
    p.add_argument("--name", help="index name (folder under index/)")
    p.add_argument("--factory", help="faiss factory string or auto")
    p.add_argument("--split", choices=("train", "test"))
    p.add_argument("--add", action="store_true", help="add references to an existing index")
    p.add_argument("--raster", help="optical GeoTIFF mosaic to cut the references from (windowed, resumable; instead of the dataset)")
    p.add_argument("--patch-px", dest="patch_px", type=int, help="reference patch side on --raster, pixels")
    p.add_argument("--stride-px", dest="stride_px", type=int, help="reference grid stride on --raster, pixels")
    p.add_argument("--shards", type=int, help="split the index into this many FAISS files searched as one")
    p.add_argument("--engine", choices=("faiss", "milvus"), help="vector engine (index.engine): faiss files, or Milvus (Lite file or server; docs/SCALE.md)")
    p.add_argument("--uri", help="with --engine milvus: a local .db path (Milvus Lite) or http://host:19530 (default index/<name>/milvus.db)")
    p.add_argument("--dask", nargs="?", const="local", metavar="SCHEDULER",
                   help="with --raster: embed the mosaic's blocks on Dask, a LocalCluster without an address, else the scheduler at tcp://host:8786")
    p.add_argument("--dask-workers", dest="dask_workers", type=int, help="workers of the local Dask cluster (default cores / index.dask_threads)")
    p.set_defaults(func=cmd_index_build)
    p = s_idx.add_parser("info", help="print an index manifest")
    p.add_argument("path", help="index folder")
    p.set_defaults(func=cmd_index_info)

    # model (shipped weights + card)
    p_model = sub.add_parser("model", help="shipped models: weights/<name>/card.json")
    s_model = p_model.add_subparsers(dest="sub", required=True)
    p = s_model.add_parser("info", help="print a model card (files, input conventions, metrics)")
    p.add_argument("model", help="registered name or card.json path")
    p.add_argument("--verify", action="store_true", help="also check every file's size and sha256 against the card")
    p.set_defaults(func=cmd_model_info)
    p = s_model.add_parser("seal", help="record the files' sha256 and sizes (and the embedder's model config) in card.json")
    p.add_argument("model", help="registered name, model folder or card.json path")
    p.set_defaults(func=cmd_model_seal)
    p = s_model.add_parser("fuse", help="fuse embedder checkpoints (e.g. seeds of one recipe) into one by score fusion; it embeds, indexes and localizes like any embedder")
    p.add_argument("out", help="the fused checkpoint to write (e.g. runs/NAME/emb_best.pt)")
    p.add_argument("checkpoints", nargs="+", help="member embedder checkpoints (same bands and input size)")
    p.add_argument("--weights", nargs="+", type=float, help="fusion weights, one per member (default equal; normalised to sum 1)")
    p.set_defaults(func=cmd_model_fuse)
    p = s_model.add_parser("aligner", help="keep only the dense descriptor of a refiner checkpoint (scene georeferencing's fine alignment; loads beside any embedder)")
    p.add_argument("refiner", help="refiner checkpoint trained with fine alignment (runs/NAME/refiner.pt)")
    p.add_argument("out", help="the aligner checkpoint to write (e.g. weights/NAME/aligner.pt)")
    p.set_defaults(func=cmd_model_aligner)

    # localize
    p = sub.add_parser("localize", help="localize SAR queries against an index")
    _add_common(p)
    p.add_argument("--model", help="a shipped model instead of the experiment file: a registered name (weights/<NAME>/, or $CMPC_WEIGHTS) or a card.json path")
    p.add_argument("--index", help="index name (index/<NAME>/) or folder (default: the experiment's / the model's name)")
    p.add_argument("--queries", required=True, help="folder of SAR patches, a CMPC dataset root/split, or a SAR GeoTIFF")
    p.add_argument("--out", help="output folder (default reports/<name>/localize)")
    p.add_argument("--checkpoint")
    p.add_argument("--split", default="test", help="split to read when --queries is a dataset root")
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--prior", help="GeoJSON polygon restricting candidates")
    p.add_argument("--center", type=float, nargs=2, metavar=("X", "Y"), help="prior centre, metres in the map CRS")
    p.add_argument("--radius", type=float, help="prior radius, metres")
    p.set_defaults(func=cmd_localize)

    # georef
    p = sub.add_parser("georef", help="where is this SAR scene? tile it, verify its tiles' candidates jointly, align it")
    _add_common(p)
    p.add_argument("--model", help="a shipped model (weights/<NAME>/card.json) instead of an experiment file; needs --index")
    p.add_argument("--index", help="index name under index/ or index folder (default: the experiment's serving index)")
    p.add_argument("--scene", required=True, help="SAR image (GeoTIFF, plain TIFF or PNG)")
    p.add_argument("--scene-model", dest="scene_model",
                   help="folder of the calibrated decision rule and scene-graph GNN (`cmpc train scene --out`; default runs/<name>)")
    p.add_argument("--gsd", type=float, help="metres per pixel of a scene without georeferencing")
    p.add_argument("--center", type=float, nargs=2, metavar=("X", "Y"), help="prior centre, metres in the map CRS")
    p.add_argument("--radius", type=float, help="prior radius, metres (alone: around the file's own georeferencing, default 2000 m)")
    p.add_argument("--rotation-range", dest="rotation_range", type=float, help="search headings within +-DEG (default 0: north-up)")
    p.add_argument("--top-k", dest="top_k", type=int, help="candidates per tile (default 20)")
    p.add_argument("--dense-search", dest="dense_search", type=int, metavar="N",
                   help="placements per heading from the whole-map dense search (0 = off; default: what the decision was calibrated with, 3 when uncalibrated)")
    p.add_argument("--method", choices=("verify", "gnn+verify"),
                   help="default: the one `cmpc train scene` chose on training-area validation scenes (verify when untrained)")
    p.add_argument("--checkpoint")
    p.add_argument("--out", help="output folder (default reports/<name>/georef/<scene stem>)")
    p.set_defaults(func=cmd_georef)

    # test
    p = sub.add_parser("test", help="evaluate: CMC, mAP, localization error, plots")
    _add_common(p, "required")
    p.add_argument("--checkpoint")
    p.set_defaults(func=cmd_test)

    # eval
    p_ev = sub.add_parser("eval", help="extra evaluations of a trained embedder")
    s_ev = p_ev.add_subparsers(dest="sub", required=True)
    p = s_ev.add_parser("pairs", help="N-way SAR -> optical retrieval on real patch pairs (R@k, mAP, chance levels)")
    _add_common(p, "required")
    p.add_argument("--pairs", default="bigearthnet", choices=("bigearthnet",), help="pair set")
    p.add_argument("--root", help="pair folder (default ../shared/data/real/bigearthnet-s1s2)")
    p.add_argument("--checkpoint", help="embedder checkpoint (default: runs/<name>/emb_best.pt)")
    p.add_argument("--fit", default="resize", choices=("resize", "crop", "native"),
                   help="120 px patch -> model input: resize to img_size, centre crop of img_size px, or whole patch")
    p.add_argument("--sar-scale", dest="sar_scale", default="db", choices=("db", "amplitude", "intensity"), help="SAR values fed to the model")
    p.add_argument("--sar-bands", dest="sar_bands", nargs="+", default=["VV", "VH"], metavar="BAND", help="SAR bands in model order (VV, VH)")
    p.set_defaults(func=cmd_eval_pairs)
    p = s_ev.add_parser("scenes", help="georeference every scene cut by `cmpc data scenes`; success / not-found / false-claim table")
    _add_common(p)
    p.add_argument("--model", help="a shipped model (weights/<NAME>/card.json) instead of an experiment file; needs --index")
    p.add_argument("--index", help="index name under index/ or index folder (default: the experiment's serving index)")
    p.add_argument("--scenes", help="folder cut by `cmpc data scenes`")
    p.add_argument("--redecide", metavar="REPORT",
                   help="instead of answering: apply this decision (--scene-model) to the answers of an earlier `cmpc eval scenes` report "
                        "(same candidates and tiling; refused otherwise) and write the table to --out")
    p.add_argument("--scene-model", dest="scene_model",
                   help="folder of the calibrated decision rule and scene-graph GNN (`cmpc train scene --out`; default runs/<name>)")
    p.add_argument("--methods", nargs="+", default=["independent", "verify"], choices=("independent", "verify", "gnn+verify"))
    p.add_argument("--rotation-range", dest="rotation_range", type=float, help="search headings within +-DEG (default 0)")
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--dense-search", dest="dense_search", type=int, metavar="N",
                   help="placements per heading from the whole-map dense search (0 = off; default: the decision's)")
    p.add_argument("--checkpoint")
    p.add_argument("--gsd-factor", dest="gsd_factor", type=float, default=1.0,
                   help="hand georef the true GSD times this (a misstated pixel size; default 1)")
    p.add_argument("--out", help="output folder (default reports/<name>/scenes/<scenes folder name>)")
    p.set_defaults(func=cmd_eval_scenes)

    # translate
    p_tr = sub.add_parser("translate", help="SAR <-> optical translators: train, apply, eval, checkpoint selection, ensemble")
    s_tr = p_tr.add_subparsers(dest="sub", required=True)
    p = s_tr.add_parser("train", help="train translate.model (pix2pix | cyclegan | segcyclegan) on data.root")
    _add_common(p, "required")
    p.add_argument("--model", choices=("pix2pix", "cyclegan", "segcyclegan"))
    p.add_argument("--direction", choices=("sar2opt", "opt2sar"), help="pix2pix direction")
    p.add_argument("--epochs", type=int)
    p.set_defaults(func=cmd_translate_train)
    p = s_tr.add_parser("seg", help="train the segmentation networks (judges for Seg-CycleGAN and the metrics)")
    _add_common(p, "required")
    p.add_argument("--modality", nargs="+", choices=("opt", "sar"), default=["opt", "sar"])
    p.add_argument("--force", action="store_true", help="retrain even when up to date")
    p.set_defaults(func=cmd_translate_seg)
    p = s_tr.add_parser("apply", help="translate a split's patches into a new CMPC dataset")
    _add_common(p, "required")
    p.add_argument("--checkpoint", help="translator checkpoint (default translate.checkpoint or <out>/last.pt)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--direction", choices=("sar2opt", "opt2sar"))
    p.add_argument("--out", help="output dataset root (default <data.root>_<model>_<direction>)")
    p.set_defaults(func=cmd_translate_apply)
    p = s_tr.add_parser("eval", help="PSNR, SSIM, segmentation mPA/mIoU/FwIoU and FID-seg of a translator")
    _add_common(p, "required")
    p.add_argument("--checkpoint")
    p.add_argument("--split", choices=("train", "test"))
    p.add_argument("--out", help="report folder (default reports/<name>/translate)")
    p.set_defaults(func=cmd_translate_eval)
    p = s_tr.add_parser("select", help="pick the translator checkpoint whose views give the best validation R@1")
    _add_common(p, "required")
    p.add_argument("--checkpoints", nargs="+", help="candidates (default translate.select_checkpoints or every epoch_*.pt)")
    p.set_defaults(func=cmd_translate_select)
    p = s_tr.add_parser("ensemble", help="fuse embedders by score with Optuna-tuned weights; report members and ensemble")
    _add_common(p, "required")
    p.add_argument("--members", nargs="+", help="embedder checkpoints (default translate.ensemble)")
    p.add_argument("--trials", type=int, help="Optuna trials (default translate.ensemble_trials)")
    p.add_argument("--references", nargs="+", help="embedder checkpoints reported alone, not fused (e.g. trained without translators)")
    p.set_defaults(func=cmd_translate_ensemble)

    # demo
    p = sub.add_parser("demo", help="the whole pipeline on the synthetic world")
    _add_common(p)
    p.add_argument("--fresh", action="store_true", help="regenerate every step")
    p.set_defaults(func=cmd_demo)
    return parser


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (captured output)
        pass


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a handler, turning user errors into one line and a non-zero exit.

    A reader that stops early (``cmpc config keys | head``) closes the pipe: the command
    then ends quietly with 141 (128 + SIGPIPE, what ``yes | head`` gives), no traceback.
    """
    try:
        rc = func(args)
        sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
        return rc
    except BrokenPipeError:
        _stdout_to_devnull()
        return 141
    except CmpcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # torch_geometric still calls torch.jit.script at import; the deprecation notice is noise to users.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    if os.environ.get("CMPC_THREADS"):
        # One knob for torch and faiss (OpenMP) threads: on a shared CPU, fewer threads than
        # cores avoids threads spinning against each other (see docs/BENCHMARKS.md).
        from cmpc.utils.runtime import set_threads

        set_threads(int(os.environ["CMPC_THREADS"]))
    return run(args.func, args)


def script_main(command: list[str], argv: list[str] | None = None) -> int:
    """Entry for the thin top-level scripts (train_emb.py etc.)."""
    return main(command + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
