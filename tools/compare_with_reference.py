"""Compare converted checkpoints with the reference implementations' own code (not run by the test suite).

The tests check each converter against an independent functional re-computation of the reference
architecture; this script closes the loop with the references' real code: it builds each reference model from
its own sources, gives it random weights and random batch-norm statistics, saves it in that reference's on-disk
format, converts the file with ``panoptic_deeplab.convert`` and prints the largest difference of the raw outputs
(semantic logits, center heatmap, offsets) on the same random image.

    python tools/compare_with_reference.py --d2 PATH/TO/detectron2 --bc PATH/TO/panoptic-deeplab

``--d2`` is a detectron2 checkout (imported from source: its C++ extension is not needed), ``--bc`` a
bowenc0221/panoptic-deeplab checkout; their Python dependencies (fvcore, iopath, omegaconf, cloudpickle, yacs)
must be installed. The reference code only runs here, never in the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

from panoptic_deeplab.convert import convert_checkpoint
from panoptic_deeplab.inference.predictor import Predictor


def randomize(model: nn.Module, seed: int) -> None:
    """Random weights at a scale that keeps activations finite, and random BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:  # BN scale: below 1 so that 50 residual blocks do not blow the activations up
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.3)
            elif t.dim() == 4:
                fan_in = t.shape[1] * t.shape[2] * t.shape[3]
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def ours_raw(path: Path, image: torch.Tensor) -> dict[str, torch.Tensor]:
    predictor = Predictor.from_checkpoint(path, device="cpu")
    return predictor.raw_outputs([image])[0]


def report(name: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    parts = []
    for key in ("semantic", "center", "offset"):
        a, b = theirs[key].float(), ours[key].float()
        assert a.shape == b.shape, (key, a.shape, b.shape)
        diff = (a - b).abs().max().item()
        scale = a.abs().max().item()
        parts.append(f"{key} {diff:.2e} (of max |value| {scale:.2e})")
        worst = max(worst, diff / max(scale, 1e-12))
    print(f"{name}: max abs difference " + ", ".join(parts) + f"; worst relative {worst:.2e}")
    return worst


def compare_d2(repo: Path, work: Path) -> None:
    sys.path.insert(0, str(repo))
    if "panopticapi" not in sys.modules:  # imported by the dataset mapper only
        stub = types.ModuleType("panopticapi")
        stub.utils = types.ModuleType("panopticapi.utils")  # type: ignore[attr-defined]
        stub.utils.rgb2id = None  # type: ignore[attr-defined]
        sys.modules["panopticapi"], sys.modules["panopticapi.utils"] = stub, stub.utils  # type: ignore[attr-defined]
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    # D2's project package is also called panoptic_deeplab: load it under another name (relative imports only).
    package = repo / "projects" / "Panoptic-DeepLab" / "panoptic_deeplab"
    spec = importlib.util.spec_from_file_location("d2_panoptic_deeplab", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    d2_project = importlib.util.module_from_spec(spec)
    sys.modules["d2_panoptic_deeplab"] = d2_project
    spec.loader.exec_module(d2_project)
    add_panoptic_deeplab_config = d2_project.add_panoptic_deeplab_config

    configs = repo / "projects" / "Panoptic-DeepLab" / "configs"
    cases = [
        ("d2 cityscapes dsconv", configs / "Cityscapes-PanopticSegmentation"
         / "panoptic_deeplab_R_52_os16_mg124_poly_90k_bs32_crop_512_1024_dsconv.yaml", (1024, 2048)),
        ("d2 cityscapes standard", configs / "Cityscapes-PanopticSegmentation"
         / "panoptic_deeplab_R_52_os16_mg124_poly_90k_bs32_crop_512_1024.yaml", (512, 1024)),
        ("d2 coco dsconv", configs / "COCO-PanopticSegmentation"
         / "panoptic_deeplab_R_52_os16_mg124_poly_200k_bs64_crop_640_640_coco_dsconv.yaml", (480, 640)),
    ]
    for seed, (name, config, (height, width)) in enumerate(cases):
        cfg = get_cfg()
        add_panoptic_deeplab_config(cfg)
        cfg.merge_from_file(str(config))
        cfg.MODEL.DEVICE = "cpu"
        for section in (cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.INS_EMBED_HEAD):
            section.NORM = "BN"  # SyncBN needs a process group; same parameters and eval computation
        model = build_model(cfg).eval()
        randomize(model, seed)
        file = work / f"d2_{seed}.pkl"
        with open(file, "wb") as f:  # the model zoo's layout: numpy arrays under "model"
            pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()},
                         "__author__": "compare_with_reference"}, f)
        image = torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(seed)).float()
        with torch.no_grad():
            normalized = (image[None] - model.pixel_mean[None]) / model.pixel_std[None]
            size_div = cfg.MODEL.PANOPTIC_DEEPLAB.SIZE_DIVISIBILITY
            if size_div > 0:  # ImageList.from_tensors pads bottom/right with 0 (after normalisation)
                pad_h, pad_w = (-height) % size_div, (-width) % size_div
                normalized = nn.functional.pad(normalized, (0, pad_w, 0, pad_h))
            features = model.backbone(normalized)
            semantic, _ = model.sem_seg_head(features)
            center, offset, _, _ = model.ins_embed_head(features)
        theirs = {"semantic": semantic[..., :height, :width], "center": center[..., :height, :width],
                  "offset": offset[..., :height, :width]}
        out = work / f"d2_{seed}.pt"
        convert_checkpoint("d2", file, out, progress=False)
        report(name, theirs, ours_raw(out, image / 255.0))


def compare_bc(repo: Path, work: Path) -> None:
    sys.path.insert(0, str(repo))
    import torchvision.models

    if not hasattr(torchvision.models, "utils"):  # BC imports torchvision.models.utils (removed in torchvision 0.14)
        from torch.hub import load_state_dict_from_url

        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = load_state_dict_from_url  # type: ignore[attr-defined]
        sys.modules["torchvision.models.utils"] = shim
    from segmentation.config import config as bc_config
    from segmentation.model import build_segmentation_model_from_cfg

    cases = [("bc R50-os32", "panoptic_deeplab_R50_os32_cityscapes.yaml"),
             ("bc R101-os32", "panoptic_deeplab_R101_os32_cityscapes.yaml"),
             ("bc X101-32x8d-os32", "panoptic_deeplab_X101_32x8d_os32_cityscapes.yaml")]
    for seed, (name, config) in enumerate(cases):
        cfg = bc_config.clone()
        cfg.merge_from_file(str(repo / "configs" / config))
        cfg.MODEL.BACKBONE.PRETRAINED = False
        model = build_segmentation_model_from_cfg(cfg).eval()
        randomize(model, 100 + seed)
        file = work / f"bc_{seed}.pth"
        torch.save(model.state_dict(), file)  # final_state.pth
        height, width = 513, 1025  # k*32+1, as BC's test crop
        image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))
        mean = torch.tensor(cfg.DATASET.MEAN).view(3, 1, 1)
        std = torch.tensor(cfg.DATASET.STD).view(3, 1, 1)
        with torch.no_grad():
            theirs = dict(model(((image - mean) / std)[None]))
        out = work / f"bc_{seed}.pt"
        convert_checkpoint("bc", file, out, progress=False)
        report(name, theirs, ours_raw(out, image))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d2", type=Path, help="a detectron2 checkout")
    parser.add_argument("--bc", type=Path, help="a bowenc0221/panoptic-deeplab checkout")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.d2:
            compare_d2(args.d2, Path(tmp))
        if args.bc:
            compare_bc(args.bc, Path(tmp))


if __name__ == "__main__":
    main()
