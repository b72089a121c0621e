"""The `panoptic-deeplab` command line: a thin layer over the Python API.

Each verb is a pair of functions, ``_add_<verb>(subparsers)`` and ``_run_<verb>(args) -> int``,
listed in ``COMMANDS``. Heavy imports happen inside the run functions so that ``--help`` is fast.

Exit codes: 0 success, 1 the work found problems (e.g. ``validate`` reported errors), 2 bad usage or
bad input (a clear message is printed to stderr), 130 interrupted, 141 the reader of stdout went away
(``... | head``: quietly, as a process ended by SIGPIPE).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from panoptic_deeplab.filekind import check_output_dir

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: train stopped on SIGTERM/SIGUSR1 after a checkpoint; requeue with --resume auto
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE, what a shell reports for `ls | head`'s ls


def _parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not of the form HxW, e.g. 256x512") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


# Each entry: (verb, add_parser, run). Filled below the command definitions.
COMMANDS: list[tuple[str, Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = []


def _add_make_synthetic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-synthetic",
        help="write the built-in synthetic panoptic dataset (COCO panoptic format)",
        description="Write DIR/<split>/images/*.png, DIR/<split>/panoptic/*.png and "
        "DIR/<split>/panoptic_<split>.json. The same seed gives identical files.",
    )
    p.add_argument("--out", required=True, help="output directory DIR")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--num", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--size", type=_parse_size, default=(256, 512), help="HxW (default 256x512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=_parse_size, default=(1, 1), metavar="RxC",
                   help="each image a grid of R x C independent scenes of --size, objects at the scale of --size "
                   "(large images for tiled prediction; default 1x1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_make_synthetic(args: argparse.Namespace) -> int:
    from panoptic_deeplab.data.synthetic import make_synthetic_dataset

    check_output_dir(args.out, "--out")
    paths = make_synthetic_dataset(args.out, args.split, args.num, args.size, args.seed,
                                   progress=not args.no_progress, scenes=args.scenes)
    print(f"wrote {args.num} images: --json {paths.json_path} --png-dir {paths.png_dir} "
          f"--images {paths.image_dir}")
    return EXIT_OK


# The options each source needs (argparse cannot require an option for one --from value only).
CONVERT_DATASET_SOURCES = {
    "semantic-instance": ("--images", "--categories", "--semantic", "--instance"),
    "label-map": ("--images", "--categories", "--labels"),
    "cityscapes": ("--cityscapes",),
    "coco-instances": ("--images", "--instances"),
    "mapillary": ("--mapillary",),
}
DROPPED_BECAUSE = {"coco-instances": "annotations that others cover entirely",
                   "mapillary": "no pixels left at the new size"}


def _add_convert_dataset(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-dataset",
        help="labelled data in another form -> a COCO panoptic split (then validate, train)",
        description="Writes OUT/<split>/images (links to your images, or copies), OUT/<split>/panoptic/*.png and "
        "OUT/<split>/panoptic_<split>.json with area, bbox and iscrowd, then validates the split. Sources: "
        "semantic-instance (a semantic PNG of category ids and an instance PNG per image, named like the image: "
        "--semantic DIR --instance DIR) and label-map (class * divisor + instance per pixel: --labels DIR, 16-bit "
        "PNG, 32-bit TIFF or .npy). Stuff classes give one segment per image, each (thing class, instance id > 0) "
        "one instance, thing pixels with instance 0 the class's crowd region; --ignore-label is void. cityscapes "
        "(--cityscapes ROOT with gtFine/ and leftImg8bit/): what cityscapesscripts' createPanopticImgs writes, "
        "label ids or --train-ids, no environment variables. coco-instances (--instances JSON --images DIR, "
        "optionally --stuff DIR of stuff maps with --categories): overlapping annotations give each pixel to the "
        "smallest mask, crowds only what no instance covers. mapillary (--mapillary ROOT, --split train or val, "
        "--version v1.2 or v2.0): resized to a long side of --long-side pixels (the paper's 2177; 0 keeps "
        "the sizes). Exit status: "
        "0 written and valid, 1 written with problems (listed), 2 unusable input (the message names the file).",
    )
    p.add_argument("--from", dest="source", required=True, choices=sorted(CONVERT_DATASET_SOURCES))
    p.add_argument("--images", help="semantic-instance, label-map, coco-instances: folder of the images")
    p.add_argument("--categories",
                   help="semantic-instance, label-map: YAML or JSON list of categories: id, name, isthing (1 thing, "
                   "0 stuff), optional color; coco-instances: the stuff categories of --stuff (and colours)")
    p.add_argument("--out", required=True, help="output directory OUT")
    p.add_argument("--split", default="train", help="split name (default train)")
    p.add_argument("--semantic", help="semantic-instance: folder of semantic maps (category id per pixel)")
    p.add_argument("--instance", help="semantic-instance: folder of instance maps (instance id per pixel)")
    p.add_argument("--labels", help="label-map: folder of label maps (class * divisor + instance)")
    p.add_argument("--label-divisor", type=int, default=1000, help="label-map: the divisor (default 1000)")
    p.add_argument("--ignore-label", type=int, default=255, help="the class value that means void (default 255)")
    p.add_argument("--cityscapes", help="cityscapes: the dataset root (gtFine/, leftImg8bit/); --split names its split")
    p.add_argument("--train-ids", action="store_true", help="cityscapes: category ids are train ids 0..18")
    p.add_argument("--instances", help="coco-instances: the COCO instances JSON (polygons or RLE)")
    p.add_argument("--mapillary", help="mapillary: the dataset root (training/, validation/); --split names its split")
    p.add_argument("--version", choices=("v1.2", "v2.0"), default="v1.2",
                   help="mapillary: the label version (default v1.2, 65 classes, the paper's)")
    p.add_argument("--long-side", type=int, default=2177,
                   help="mapillary: resize every image to this long side (default 2177, the paper's; 0 keeps them)")
    p.add_argument("--stuff", help="coco-instances: folder of stuff maps (category id per pixel, named like the "
                   "images), optional")
    p.add_argument("--copy-images", action="store_true", help="copy the images instead of linking them")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _run_convert_dataset(args: argparse.Namespace) -> int:
    from panoptic_deeplab.data.converters import (
        convert_cityscapes,
        convert_coco_instances,
        convert_label_maps,
        convert_mapillary,
        convert_semantic_instance,
    )
    from panoptic_deeplab.data.validate import summarize, validate_dataset

    needed = CONVERT_DATASET_SOURCES[args.source]
    missing = [option for option in needed if getattr(args, option[2:]) is None]
    if missing:
        raise ValueError(f"--from {args.source} needs {', '.join(needed)}; missing {', '.join(missing)}")
    check_output_dir(args.out, "--out")
    common = dict(out_dir=args.out, split=args.split, copy_images=args.copy_images, progress=not args.no_progress)
    if args.source == "cityscapes":
        split = convert_cityscapes(args.cityscapes, train_ids=args.train_ids, **common)
    elif args.source == "mapillary":
        split = convert_mapillary(args.mapillary, version=args.version, long_side=args.long_side, **common)
    elif args.source == "coco-instances":
        split = convert_coco_instances(args.images, args.instances, stuff=args.stuff, categories=args.categories,
                                       ignore_label=args.ignore_label, **common)
    elif args.source == "semantic-instance":
        split = convert_semantic_instance(args.images, args.semantic, args.instance, args.categories,
                                          ignore_label=args.ignore_label, **common)
    else:
        split = convert_label_maps(args.images, args.labels, args.categories, label_divisor=args.label_divisor,
                                   ignore_label=args.ignore_label, **common)
    print(f"wrote {split.images} images: {split.thing_segments} thing instances, {split.crowd_segments} crowd "
          f"regions, {split.stuff_segments} stuff regions"
          + (f"; {split.dropped_segments} segments dropped ({DROPPED_BECAUSE[args.source]})"
             if split.dropped_segments else ""))
    problems = validate_dataset(split.json_path, split.png_dir, split.image_dir, progress=not args.no_progress)
    for problem in problems:
        print(problem)
    print(f"validate: {summarize(problems)}")
    print(f"--json {split.json_path} --png-dir {split.png_dir} --images {split.image_dir}")
    return EXIT_PROBLEMS if problems else EXIT_OK


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a COCO panoptic dataset and list every problem",
        description="Exit status: 0 no problem, 1 problems found (all are printed), 2 unusable arguments.",
    )
    p.add_argument("--json", required=True, help="COCO panoptic annotation JSON")
    p.add_argument("--png-dir", required=True, help="directory of the panoptic PNGs")
    p.add_argument("--images", required=True, help="directory of the images")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_validate(args: argparse.Namespace) -> int:
    from panoptic_deeplab.data.validate import summarize, validate_dataset

    problems = validate_dataset(args.json, args.png_dir, args.images, progress=not args.no_progress)
    for problem in problems:
        print(problem)
    print(f"validate: {summarize(problems)}")
    return EXIT_PROBLEMS if problems else EXIT_OK


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (single process, or under torchrun for several GPUs / nodes)",
        description="Train with a preset or YAML config plus key=value overrides (e.g. solver.lr=5e-4). "
        "Several processes: torchrun --nproc_per_node N -m panoptic_deeplab.cli train ... "
        "SIGTERM or SIGUSR1 (what schedulers send before a kill) writes a checkpoint at the current iteration and "
        "exits with status 75; --resume auto then continues exactly. "
        "Exit status: 0 done, 1 training diverged (NaN/inf loss) or a checkpoint could not be written (full "
        "disk), 2 unusable config, data or checkpoint, 75 "
        "preempted (checkpoint written).",
    )
    p.add_argument("--config", required=True, help="preset name (e.g. synthetic_mnv3) or YAML file")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from a checkpoint: 'auto' = the latest in the output directory (if any)")
    p.add_argument("--output-dir", default=None, help="overrides train.output_dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. solver.max_iter=1000")


def _run_train(args: argparse.Namespace) -> int:
    import logging
    import os

    from panoptic_deeplab.checkpoint import CheckpointError
    from panoptic_deeplab.config import load_config
    from panoptic_deeplab.engine.distributed import is_peer_failure, rank_prefix
    from panoptic_deeplab.engine.trainer import CheckpointWriteError, TrainingDivergedError, TrainingPreempted, train

    # Under torchrun only rank 0 reports progress; the other ranks print warnings and errors.
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    if args.output_dir is not None:
        cfg.train.output_dir = args.output_dir
    check_output_dir(cfg.train.output_dir, "--output-dir" if args.output_dir is not None else "train.output_dir")
    where = rank_prefix()
    try:
        result = train(cfg, resume=args.resume)
    except (TrainingDivergedError, CheckpointWriteError) as exc:
        print(f"error: {where}{exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except TrainingPreempted as exc:
        print(f"preempted: {where}{exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except CheckpointError as exc:
        print(f"error: {where}{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as exc:
        if not (where and is_peer_failure(exc)):
            raise
        # The failed process printed its own error; this one only says why it stopped too.
        print(f"error: {where}stopped because another process of this job failed (its error is above; torchrun's "
              f"summary names its rank): {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_PROBLEMS
    if main_rank:
        best = f", best PQ {100 * result.best_metric:.2f} at iteration {result.best_iteration}" \
            if result.best_metric is not None else ""
        print(f"trained to iteration {result.iteration}{best}; checkpoints in {cfg.train.output_dir}")
    return EXIT_OK


def _add_model_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model-info",
        help="print parameters and multiply-adds of the network (backbone / semantic / instance)",
        description="Counts on the meta device: no weights are loaded and nothing is computed. "
        "Multiply-adds cover convolutions and matrix products (FLOPs / 2).",
    )
    p.add_argument("--backbone", default="mobilenetv3_large",
                   help="preset (mobilenetv3_large, resnet50, resnet101, xception65, xception71) or timm name")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--size", type=_parse_size, default=(1025, 2049), help="input HxW (default 1025x2049)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=16)
    p.add_argument("--aspp-separable", action="store_true", help="depthwise-separable ASPP convs (D2)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_model_info(args: argparse.Namespace) -> int:
    import json

    from panoptic_deeplab.config import ModelConfig
    from panoptic_deeplab.modeling.flops import format_model_info, model_info

    cfg = ModelConfig(backbone=args.backbone, pretrained=False, num_classes=args.num_classes,
                      output_stride=args.output_stride, aspp_separable=args.aspp_separable)
    info = model_info(cfg, args.size)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_model_info(info))
    return EXIT_OK


def _parse_scales(text: str) -> tuple[float, ...]:
    """'0.75,1,1.25' -> (0.75, 1.0, 1.25)."""
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales {text!r} are not comma-separated numbers, e.g. 0.75,1,1.25") from None
    if any(not s > 0 for s in scales):
        raise argparse.ArgumentTypeError(f"scales {text!r} must all be positive")
    return scales


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="run a trained model on an image or a folder of images",
        description="Writes OUT/predictions.json + OUT/panoptic/<stem>.png (COCO panoptic format) and, "
        "unless --no-pictures, OUT/pictures/<stem>_overlay.png, <stem>_center.png and <stem>_offset.png. "
        "Unreadable images are skipped with a warning and exit status 1; the others are still written.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint file written by train or convert")
    model.add_argument("--onnx", help="an ONNX file written by export, run by ONNX Runtime on the CPU (extra "
                       "'export'); the same outputs as its checkpoint")
    p.add_argument("--input", required=True, help="an image file, a folder of images, or a video file (.mp4, .mov, "
                   ".avi, .mkv, .webm; extra 'video'): its frames are predicted as a --sequence and the overlays "
                   "written as OUT/<stem>_overlay.mp4")
    p.add_argument("--output", required=True, help="output directory OUT")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:K")
    p.add_argument("--categories", default=None, metavar="JSON",
                   help="COCO panoptic JSON whose categories to use (for checkpoints without them)")
    p.add_argument("--tta-flip", action="store_true", help="also average the horizontally flipped image")
    p.add_argument("--tta-scales", type=_parse_scales, default=(1.0,), metavar="S1,S2,...",
                   help="average over these input scales, e.g. 0.75,1,1.25 (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    _add_precision(p)
    p.add_argument("--tile", type=_parse_size, default=None, metavar="HxW",
                   help="run images larger than this on overlapping tiles, stitched before one post-processing "
                   "(large images: the network's memory follows the tile)")
    p.add_argument("--tile-overlap", type=int, default=None, metavar="P",
                   help="pixels shared by neighbouring tiles (default a quarter of the tile's smaller side)")
    p.add_argument("--tile-context-passes", type=int, default=None, metavar="N",
                   help="with --tile: backbone passes over the tiles that gather the whole image's averages for the "
                   "layers that average their input (image pooling, squeeze-excite); 2 brings the tiled result "
                   "closer to the whole image's for one more backbone run per tile (default 1)")
    p.add_argument("--low-memory", action="store_true",
                   help="with --tile: post-process the stitched maps band by band instead of holding them whole "
                   "(images larger than memory allows; the network runs twice per tile)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep the K highest instance centers per image (default the model's post-processing "
                   "setting, 200 for most; at most 999): raise it for large images with many objects")
    p.add_argument("--sequence", action="store_true",
                   help="the images are the frames of one video, in file name order: each object keeps its "
                   "instance id and PNG segment id (category_id * 1000 + instance) over the frames (tracking)")
    p.add_argument("--no-pictures", action="store_true", help="only write the COCO panoptic predictions")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_precision(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                        help="network arithmetic: fp32 (exact, default), tf32 (CUDA's TF32 convolutions: ResNet-50 "
                        "1.25x faster on an H200, labels less exact) or bf16 (batch norms folded into the convolutions, "
                        "then bfloat16 autocast; about 2x faster end to end on CPUs with AVX512-BF16/AMX, 1.0-1.2x on "
                        "an H200); tf32 and bf16 for checkpoints only")


def _run_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from panoptic_deeplab.data.coco_panoptic import load_panoptic_json
    from panoptic_deeplab.checkpoint import CheckpointError, load_checkpoint
    from panoptic_deeplab.inference.predictor import Predictor, list_images, predict_folder
    from panoptic_deeplab.inference.video import is_video
    from panoptic_deeplab.inference.visualize import save_pictures

    check_output_dir(args.output, "--output")
    video = is_video(args.input)
    if video and not Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input}: no such video file")
    paths = [] if video else list_images(args.input)
    options = dict(tta_flip=args.tta_flip, tta_scales=args.tta_scales, batch_size=args.batch_size)
    tile_options = {"--tile-overlap": args.tile_overlap is not None, "--low-memory": args.low_memory,
                    "--tile-context-passes": args.tile_context_passes is not None}
    for option, given in tile_options.items():
        if given and args.tile is None:
            raise ValueError(f"{option} needs --tile")
    if args.low_memory and (args.sequence or video):
        raise ValueError("--low-memory applies to single images: videos and --sequence hold each frame's maps whole")
    if args.tile is not None:
        options.update(tile=args.tile, tile_overlap=args.tile_overlap, low_memory=args.low_memory,
                       tile_context_passes=1 if args.tile_context_passes is None else args.tile_context_passes)
    if args.onnx:
        from panoptic_deeplab.export import onnx_predictor, read_onnx_metadata

        if args.categories or args.device not in ("auto", "cpu") or args.precision != "fp32":
            print("error: --onnx takes neither --categories (the file holds its categories), --device "
                  f"{args.device} (ONNX Runtime runs on the CPU here) nor --precision {args.precision} (the graph "
                  "runs as exported)", file=sys.stderr)
            return EXIT_BAD_INPUT
        # Parsing the file costs as much as loading it: only for --top-k. A whole-pipeline file refuses other
        # post-processing settings (onnx_predictor says so).
        postprocess = None if args.top_k is None else _with_top_k(
            read_onnx_metadata(args.onnx)["config"], f"metadata of {args.onnx}", args.top_k)
        predictor = onnx_predictor(args.onnx, postprocess=postprocess, **options)
        if (args.sequence or video) and not isinstance(predictor, Predictor):
            print(f"error: videos and --sequence need the network only: {args.onnx} holds the whole pipeline "
                  "(export with --no-postprocess)", file=sys.stderr)
            return EXIT_BAD_INPUT
    else:
        meta = load_panoptic_json(args.categories).meta if args.categories else None
        try:
            checkpoint = load_checkpoint(args.checkpoint, map_location="cpu")
            postprocess = _with_top_k(checkpoint.get("config"), f"config of checkpoint {args.checkpoint}", args.top_k)
            predictor = Predictor.from_checkpoint_state(checkpoint, args.checkpoint, device=args.device, meta=meta,
                                                        postprocess=postprocess, precision=args.precision, **options)
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    out = Path(args.output)
    if video:
        return _predict_video(predictor, Path(args.input), out, args.no_pictures, args.no_progress)
    pictures = out / "pictures"
    if not args.no_pictures:
        pictures.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=len(paths), unit="img", disable=args.no_progress or len(paths) == 1)
    unreadable: list[Path] = []

    def skip(path: Path, error: Exception) -> None:
        unreadable.append(path)
        progress.write(f"warning: skipped {error}", file=sys.stderr)
        progress.update(1)

    for path, image, result in predict_folder(
        predictor, paths, out / "predictions.json", out / "panoptic", on_unreadable=skip, sequence=args.sequence
    ):
        if not args.no_pictures:
            save_pictures(image, result, predictor.meta, pictures, path.stem)
        progress.update(1)
    progress.close()
    print(f"predicted {len(paths) - len(unreadable)} image(s): {out / 'predictions.json'}, {out / 'panoptic'}"
          + ("" if args.no_pictures else f", pictures in {pictures}"))
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable image(s): {', '.join(p.name for p in unreadable)}",
              file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


def _with_top_k(config: Any, source: str, top_k: int | None) -> Any:
    """The post-processing settings of a saved config with ``top_k`` replaced; None (keep them) without a top_k or
    a config (the predictor then reports what is missing)."""
    import dataclasses

    from panoptic_deeplab.config import config_from_dict

    if top_k is None or not isinstance(config, dict):
        return None
    return dataclasses.replace(config_from_dict(config, source=source).postprocess, top_k=top_k)


def _predict_video(predictor: Any, video: Path, out: Path, no_pictures: bool, no_progress: bool) -> int:
    """predict on a video file: the frames as a tracked sequence, and the overlays as a video beside them."""
    import contextlib

    import numpy as np
    from tqdm import tqdm

    from panoptic_deeplab.inference.video import VideoWriter, predict_video, video_info
    from panoptic_deeplab.inference.visualize import overlay_panoptic

    total, fps = video_info(video)
    out.mkdir(parents=True, exist_ok=True)
    overlay_path = out / f"{video.stem}_overlay.mp4"
    with contextlib.ExitStack() as stack:
        writer = None if no_pictures else stack.enter_context(VideoWriter(overlay_path, fps))
        progress = stack.enter_context(tqdm(total=total or None, unit="frame", disable=no_progress))
        frames = 0
        for _, frame, result in predict_video(predictor, video, out / "predictions.json", out / "panoptic"):
            if writer is not None:
                writer.write(np.asarray(overlay_panoptic(frame, result.label_map, predictor.meta, legend=False)))
            frames += 1
            progress.update(1)
    print(f"predicted {frames} frame(s) of {video} (instances tracked across frames): {out / 'predictions.json'}, "
          f"{out / 'panoptic'}" + ("" if no_pictures else f", overlay video {overlay_path}"))
    return EXIT_OK


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="PQ / mIoU / AP of a checkpoint on a dataset split, or PQ of prediction files",
        description="Model form: --checkpoint C [--config CFG] [--split val] [key=value ...] predicts every image "
        "of the split (paths from the checkpoint's config, or from --config, plus overrides) and reports PQ/SQ/RQ, "
        "mIoU, COCO and Cityscapes mask AP; --predictions-dir also writes the predictions (COCO panoptic) for the "
        "files form. Files form: --gt-json/--gt-dir against --pred-json/--pred-dir, all in the COCO panoptic "
        "format; PQ exactly as panopticapi pq_compute. Prints a table and writes the full report (per class and "
        "per image) to --output. Exit status: 0 done, 2 unusable arguments, checkpoint or dataset.",
    )
    # the source of the predictions: prediction files, or a model that predicts the split
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pred-json", help="files form: predicted COCO panoptic JSON (needs --pred-dir)")
    source.add_argument("--checkpoint", help="model form: checkpoint file written by train")
    files = p.add_argument_group("files form")
    files.add_argument("--gt-json", help="ground-truth COCO panoptic JSON (its categories are used)")
    files.add_argument("--gt-dir", help="directory of the ground-truth panoptic PNGs")
    files.add_argument("--pred-dir", help="directory of the predicted panoptic PNGs")
    files.add_argument("--workers", type=int, default=None, help="threads reading and scoring images (default: all CPUs)")
    model = p.add_argument_group("model form")
    model.add_argument("--config", default=None, help="preset or YAML replacing the checkpoint's saved config")
    model.add_argument("--split", choices=("val", "train"), default="val", help="split of data.<split> (default val)")
    model.add_argument("--predictions-dir", default=None, metavar="DIR",
                       help="also write DIR/predictions.json + DIR/panoptic/*.png (COCO panoptic)")
    model.add_argument("--max-images", type=int, default=None, metavar="N", help="only the first N images")
    model.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:K")
    model.add_argument("--tta-flip", action="store_true", help="also average the horizontally flipped image")
    model.add_argument("--tta-scales", type=_parse_scales, default=(1.0,), metavar="S1,S2,...",
                       help="average over these input scales, e.g. 0.75,1,1.25 (default 1)")
    model.add_argument("--batch-size", type=int, default=None,
                       help="images per forward pass (default data.eval_batch_size)")
    _add_precision(model)
    model.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, e.g. postprocess.stuff_area=4096 data.val.json=...")
    p.add_argument("--output", default=None, metavar="REPORT.json", help="write the report as JSON (atomically)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_evaluate(args: argparse.Namespace) -> int:
    form, other = ("model", "files") if args.checkpoint is not None else ("files", "model")
    misplaced = {
        "model": [("--gt-json", args.gt_json), ("--gt-dir", args.gt_dir), ("--pred-dir", args.pred_dir),
                  ("--workers", args.workers)],
        "files": [("--config", args.config), ("--split", args.split != "val"),
                  ("--predictions-dir", args.predictions_dir), ("--max-images", args.max_images),
                  ("--device", args.device != "auto"), ("--tta-flip", args.tta_flip),
                  ("--tta-scales", args.tta_scales != (1.0,)), ("--batch-size", args.batch_size),
                  ("--precision", args.precision != "fp32"),
                  ("key=value overrides", args.overrides)],
    }[form]
    wrong = [name for name, value in misplaced if value]
    if wrong:
        flag = "--checkpoint" if form == "model" else "--pred-json"
        print(f"error: {', '.join(wrong)}: only for the {other} form, not with {flag}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _run_evaluate_model(args) if form == "model" else _run_evaluate_files(args)


def _run_evaluate_files(args: argparse.Namespace) -> int:
    from panoptic_deeplab.evaluation import evaluate_panoptic_files

    missing = [name for name, value in (("--gt-json", args.gt_json), ("--gt-dir", args.gt_dir),
                                        ("--pred-dir", args.pred_dir)) if value is None]
    if missing:
        print(f"error: --pred-json needs {' and '.join(missing)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = evaluate_panoptic_files(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers,
                                     progress=not args.no_progress)
    print(report.format_table())
    if args.output is not None:
        report.save_json(args.output)
        print(f"report written to {args.output}")
    return EXIT_OK


def _run_evaluate_model(args: argparse.Namespace) -> int:
    from panoptic_deeplab.checkpoint import CheckpointError, load_checkpoint
    from panoptic_deeplab.data.coco_panoptic import DatasetMeta
    from panoptic_deeplab.data.dataset import PanopticDataset
    from panoptic_deeplab.evaluation.evaluator import evaluate_model, evaluation_config
    from panoptic_deeplab.inference.predictor import Predictor

    for name, value in (("--max-images", args.max_images), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            print(f"error: {name} must be >= 1, got {value}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        checkpoint = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.predictions_dir is not None:
        check_output_dir(args.predictions_dir, "--predictions-dir")
    cfg = evaluation_config(checkpoint, args.checkpoint, args.config, args.overrides)
    # The split's JSON gives the categories; a checkpoint's own list (when saved) must agree with it.
    dataset = PanopticDataset(getattr(cfg.data, args.split), transform=None, name=args.split)
    meta = DatasetMeta.from_json(checkpoint["meta"]) if "meta" in checkpoint else dataset.meta
    predictor = Predictor.from_checkpoint_state(
        checkpoint, args.checkpoint, cfg, meta=meta, device=args.device, tta_flip=args.tta_flip,
        tta_scales=args.tta_scales, batch_size=args.batch_size or cfg.data.eval_batch_size, precision=args.precision,
    )
    report = evaluate_model(predictor, dataset, predictions_dir=args.predictions_dir, max_images=args.max_images,
                            progress=not args.no_progress, num_workers=cfg.data.num_workers)
    print(report.format_table())
    if args.predictions_dir is not None:
        print(f"predictions written to {args.predictions_dir}")
    if args.output is not None:
        report.save_json(args.output)
        print(f"report written to {args.output}")
    return EXIT_OK




def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="turn a published checkpoint of detectron2, bowenc0221/panoptic-deeplab or deeplab2 into one of this project",
        description="Reads the reference's file (a path, or a URL downloaded once into ~/.cache/panoptic_deeplab or "
        "$PANOPTIC_DEEPLAB_CACHE), rebuilds its exact architecture and writes OUT.pt (weights + config + "
        "categories) for predict, evaluate and fine-tuning (model.init_checkpoint). Every tensor must fit: "
        "otherwise nothing is written and the missing / unexpected names are listed. docs/MODEL_ZOO.md lists the "
        "published files. Exit status: 0 written, 2 unusable input.",
    )
    p.add_argument("--from", dest="source", required=True, choices=("bc", "d2", "dl2"),
                   help="bc = bowenc0221/panoptic-deeplab (.pth), d2 = detectron2 Panoptic-DeepLab (.pkl/.pth), "
                   "dl2 = deeplab2 (TF2 checkpoint: .tar.gz, its folder or a ckpt-N prefix; no TensorFlow needed)")
    p.add_argument("--input", required=True, help="the reference checkpoint: a file, folder or an http(s) URL")
    p.add_argument("--output", required=True,
                   help="the checkpoint to write, e.g. OUT.pt; an existing directory receives <input name>.pt")
    p.add_argument("--dataset", default=None, metavar="cityscapes|coco|JSON",
                   help="categories of the model's classes (default: cityscapes for 19 classes, coco for 133 and for "
                   "deeplab2's 134-channel COCO heads)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None,
                   help="bc: the network's output stride (default 32, the model zoo's, with three decoder "
                   "stages; 16 with two); dl2: its config's backbone.output_stride (default: known for the "
                   "published files)")
    p.add_argument("--train-crop", type=_parse_size, default=None, metavar="HxW",
                   help="d2 only: the training crop that sized its ASPP pooling (default 512x1024 Cityscapes, "
                   "640x640 COCO)")
    p.add_argument("--config", default=None, metavar="TEXTPROTO",
                   help="dl2 only: the checkpoint's deeplab2 config (.textproto): output stride, BN epsilon, atrous "
                   "rates and post-processing (default: known for the published files)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert even if some tensors hold NaN or Inf (refused by default: a corrupted file or a "
                   "diverged run)")
    p.add_argument("--no-progress", action="store_true", help="hide the download progress bar")


def _run_convert(args: argparse.Namespace) -> int:
    from panoptic_deeplab.convert import convert_checkpoint

    result = convert_checkpoint(args.source, args.input, args.output, args.dataset, output_stride=args.output_stride,
                                train_crop=args.train_crop, config=args.config, allow_nonfinite=args.allow_nonfinite,
                                progress=not args.no_progress)
    print(f"converted {result.architecture} ({result.meta.num_classes} classes, "
          f"{len(result.meta.thing_train_ids)} things) to {result.path}")
    print(f"next: panoptic-deeplab predict --checkpoint {result.path} --input IMAGES --output OUT")
    return EXIT_OK


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as an ONNX file (image in, label map and instances out) for ONNX Runtime",
        description="Exports the whole pipeline (uint8 RGB images [N, H, W, 3] -> panoptic label map, semantic map, "
        "centers, instances with classes, scores and boxes, and the raw center heatmap and offsets: padding, "
        "network and post-processing inside) or, with --no-postprocess, the network only (images in [0, 1] -> "
        "semantic logits, center heatmap, offsets). The config and categories go into the file's metadata. The "
        "export runs the graph with ONNX Runtime and prints how it compares with PyTorch; predict --onnx then "
        "gives the checkpoint's results. Needs the 'export' extra (pip install 'panoptic-deeplab[export]'). "
        "Exit status: 0 written, 2 unusable input.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file written by train or convert")
    p.add_argument("--output", required=True, help="the ONNX file to write, e.g. model.onnx")
    p.add_argument("--size", type=_parse_size, default=None, metavar="HxW",
                   help="fix the input size for runtimes that need static shapes: the whole pipeline then takes "
                   "images of exactly this size; the network only takes a size it resamples exactly (e.g. 1025x2049) "
                   "and smaller images are padded to it (default: any size)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--no-postprocess", action="store_true",
                   help="export the network only; predict --onnx runs padding, TTA and post-processing around it")


def _run_export(args: argparse.Namespace) -> int:
    from panoptic_deeplab.export import export_onnx

    result = export_onnx(args.checkpoint, args.output, size=args.size, opset=args.opset,
                         postprocess=not args.no_postprocess)
    size = f"{result.input_size[0]}x{result.input_size[1]}" if result.input_size else "any size"
    kind = "the whole pipeline" if result.postprocess else "the network"
    errors = ", ".join(f"{k} {v:.1e}" for k, v in result.max_error.items())
    print(f"exported {kind} to {result.path} (opset {result.opset}, input {size}); ONNX Runtime vs PyTorch, max "
          f"difference / std: {errors}")
    if result.label_pixels_differ is not None:
        print(f"label map pixels that differ from PyTorch on the check image: {result.label_pixels_differ}")
    print(f"next: panoptic-deeplab predict --onnx {result.path} --input IMAGES --output OUT")
    return EXIT_OK


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="make an exported ONNX file int8 (static quantization calibrated on a few images)",
        description="Writes a copy of an ONNX file of export (either kind) whose convolutions run in int8 (weights per "
        "channel, activations calibrated by ONNX Runtime's min-max method on the inputs the file's own predictor "
        "feeds it for the calibration images). Inputs, outputs and metadata are unchanged: predict --onnx runs it. "
        "Measure its accuracy before deploying it (evaluate --onnx, or benchmarks/bench_inference.py). Needs the "
        "'export' extra. Exit status: 0 written, 2 unusable input.",
    )
    p.add_argument("--onnx", required=True, help="the float ONNX file written by export")
    p.add_argument("--calibration", required=True,
                   help="an image, or a folder of images like those the model will see")
    p.add_argument("--max-images", type=int, default=16,
                   help="calibrate on at most this many images of the folder, spread over it (default 16)")
    p.add_argument("--output", required=True, help="the int8 ONNX file to write, e.g. model_int8.onnx")


def _run_quantize(args: argparse.Namespace) -> int:
    from panoptic_deeplab.export.quantize import quantize_onnx
    from panoptic_deeplab.inference.predictor import list_images

    if args.max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {args.max_images}")
    images = list_images(args.calibration)
    step = max(1, len(images) // args.max_images)
    images = images[::step][: args.max_images]
    result = quantize_onnx(args.onnx, args.output, images, progress=True)
    print(f"wrote {result.path}: {result.quantized_nodes} convolutions in int8, calibrated on "
          f"{result.calibration_images} image(s)")
    print(f"next: panoptic-deeplab predict --onnx {result.path} --input IMAGES --output OUT")
    return EXIT_OK


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on the built-in synthetic dataset: data, training, evaluation, pictures",
        description="Write the synthetic train/val splits, train the CPU preset, evaluate it on val (PQ/SQ/RQ, "
        "mIoU, AP), draw a few predictions and print where everything is. About 3.5 minutes on 2 CPU cores "
        "with the defaults (200 steps at 8 training images/s on an AMD EPYC); --iterations and the image counts "
        "make it shorter or longer. "
        "Exit status: 0 done, 1 training diverged, 2 unusable options.",
    )
    p.add_argument("--output-dir", default="demo_output", help="where everything goes (default demo_output)")
    p.add_argument("--preset", default="synthetic_mnv3", help="training preset (default synthetic_mnv3)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations (default: the preset's)")
    p.add_argument("--train-images", type=int, default=300, help="synthetic training images (default 300)")
    p.add_argument("--val-images", type=int, default=50, help="synthetic validation images (default 50)")
    p.add_argument("--size", type=_parse_size, default=(128, 256), help="synthetic image size HxW (default 128x256)")
    p.add_argument("--pictures", type=int, default=4, help="val images to draw (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.batch_size=4")


def _run_demo(args: argparse.Namespace) -> int:
    import logging

    from panoptic_deeplab.demo import DemoOptions, run_demo
    from panoptic_deeplab.engine.trainer import TrainingDivergedError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_output_dir(args.output_dir, "--output-dir")
    options = DemoOptions(
        output_dir=args.output_dir, preset=args.preset, train_images=args.train_images,
        val_images=args.val_images, image_size=args.size, iterations=args.iterations,
        num_pictures=args.pictures, seed=args.seed, overrides=args.overrides, progress=not args.no_progress,
    )
    try:
        run_demo(options)
    except TrainingDivergedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


COMMANDS.extend([
    ("make-synthetic", _add_make_synthetic, _run_make_synthetic),
    ("convert-dataset", _add_convert_dataset, _run_convert_dataset),
    ("validate", _add_validate, _run_validate),
    ("train", _add_train, _run_train),
    ("model-info", _add_model_info, _run_model_info),
    ("predict", _add_predict, _run_predict),
    ("evaluate", _add_evaluate, _run_evaluate),
    ("convert", _add_convert, _run_convert),
    ("export", _add_export, _run_export),
    ("quantize", _add_quantize, _run_quantize),
    ("demo", _add_demo, _run_demo),
])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panoptic-deeplab",
        description="Panoptic-DeepLab: train, evaluate and run bottom-up panoptic segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _, add_parser, run in COMMANDS:
        add_parser(sub)
        # the last parser added is the one for this verb
        list(sub.choices.values())[-1].set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (ValueError, FileNotFoundError, OSError) as exc:
        from panoptic_deeplab.engine.distributed import rank_prefix

        print(f"error: {rank_prefix()}{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _silence_stdout() -> None:
    """Point stdout at /dev/null: the interpreter flushes it at exit, which would raise again on the closed pipe
    (the recipe of the Python docs, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
