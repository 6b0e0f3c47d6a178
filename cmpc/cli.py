"""The ``cmpc`` command line.

Every command takes an optional experiment file and ``--set section.key=value`` overrides.
User errors (:class:`~cmpc.errors.CmpcError`) print one line ``error: ...`` and exit 2.
Heavy modules are imported lazily so ``cmpc --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from cmpc.errors import CmpcError


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
            },
        ),
    )
    summary = tile_dataset(exp)
    print(json.dumps(summary, indent=2))
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


def cmd_index_build(args: argparse.Namespace) -> int:
    from cmpc.index.build import build_index

    exp = _exp(args, _flag_overrides(args, {"name": "index.name", "factory": "index.factory", "split": "index.split", "raster": "index.raster",
                                            "patch_px": "index.patch_px", "stride_px": "index.stride_px", "shards": "index.shards"}))
    manifest = build_index(exp, checkpoint=args.checkpoint, add=args.add)
    print(json.dumps(manifest, indent=2))
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from cmpc.index.store import read_manifest

    print(json.dumps(read_manifest(args.path), indent=2))
    return 0


def cmd_localize(args: argparse.Namespace) -> int:
    from cmpc.evaluate.ranks import GroundTruthScorer
    from cmpc.localize.run import localize

    exp = _exp(args, _flag_overrides(args, {"top_k": "localize.top_k", "prior": "localize.prior", "center": "localize.prior_center",
                                            "radius": "localize.prior_radius_m"}))
    # queries with ground truth are scored too (metrics.json + plots beside the predictions)
    result = localize(exp, queries=args.queries, out=args.out, checkpoint=args.checkpoint, split=args.split,
                      scorer=GroundTruthScorer(exp.eval, exp.localize.top_k))
    print(json.dumps(result, indent=2))
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
    p.set_defaults(func=cmd_data_tile)

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

    # index
    p_idx = sub.add_parser("index", help="build or inspect a reference index")
    s_idx = p_idx.add_subparsers(dest="sub", required=True)
    p = s_idx.add_parser("build", help="embed optical references into index/<name>/")
    _add_common(p, "required")
    p.add_argument("--checkpoint", help="embedder checkpoint (default: runs/<name>/emb_best.pt)")
    p.add_argument("--name", help="index name (folder under index/)")
    p.add_argument("--factory", help="faiss factory string or auto")
    p.add_argument("--split", choices=("train", "test"))
    p.add_argument("--add", action="store_true", help="add references to an existing index")
    p.add_argument("--raster", help="optical GeoTIFF mosaic to cut the references from (windowed, resumable; instead of the dataset)")
    p.add_argument("--patch-px", dest="patch_px", type=int, help="reference patch side on --raster, pixels")
    p.add_argument("--stride-px", dest="stride_px", type=int, help="reference grid stride on --raster, pixels")
    p.add_argument("--shards", type=int, help="split the index into this many FAISS files searched as one")
    p.set_defaults(func=cmd_index_build)
    p = s_idx.add_parser("info", help="print an index manifest")
    p.add_argument("path", help="index folder")
    p.set_defaults(func=cmd_index_info)

    # localize
    p = sub.add_parser("localize", help="localize SAR queries against an index")
    _add_common(p, "required")
    p.add_argument("--queries", required=True, help="folder of SAR patches, a CMPC dataset root/split, or a SAR GeoTIFF")
    p.add_argument("--out", help="output folder (default reports/<name>/localize)")
    p.add_argument("--checkpoint")
    p.add_argument("--split", default="test", help="split to read when --queries is a dataset root")
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--prior", help="GeoJSON polygon restricting candidates")
    p.add_argument("--center", type=float, nargs=2, metavar=("X", "Y"), help="prior centre, metres in the map CRS")
    p.add_argument("--radius", type=float, help="prior radius, metres")
    p.set_defaults(func=cmd_localize)

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
