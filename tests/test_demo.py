"""`panoptic-deeplab demo` (what `make demo` runs), made tiny: every step runs and leaves its outputs."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_setup import TINY_MODEL_OVERRIDES

from panoptic_deeplab import cli


def test_demo_runs_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    code = cli.main([
        "demo", "--output-dir", str(out), "--iterations", "3", "--train-images", "4", "--val-images", "2",
        "--size", "64x128", "--pictures", "2", "--no-progress",
        *TINY_MODEL_OVERRIDES, "data.crop_size=[65,129]", "data.batch_size=2",
    ])
    assert code == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert "PQ" in printed and "mIoU" in printed and str(out / "pictures") in printed
    report = json.loads((out / "evaluation.json").read_text())
    assert report["num_images"] == 2 and 0.0 <= report["summary"]["PQ"] <= 1.0
    assert (out / "run" / "model_0000003.pt").is_file() and (out / "run" / "config.yaml").is_file()
    assert json.loads((out / "predictions" / "predictions.json").read_text())["annotations"]
    pictures = sorted(p.name for p in (out / "pictures").iterdir())
    assert pictures == sorted(f"val_00000{i}_{kind}.png" for i in range(2) for kind in ("center", "offset", "overlay"))
