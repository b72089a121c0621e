"""The `evaluate` verb, files form."""

from __future__ import annotations

import json

import pytest

from panoptic_deeplab.cli import main


def test_evaluate_files_form(panoptic_case, tmp_path, capsys):
    gt_json, gt_dir, pred_json, pred_dir = panoptic_case(["shift", "extra"], seed=9, repeats=1)
    out = tmp_path / "report.json"
    code = main(["evaluate", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--pred-json", str(pred_json),
                 "--pred-dir", str(pred_dir), "--output", str(out), "--workers", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["num_images"] == 2
    assert f"{100 * report['All']['pq']:6.2f}" in printed and "person" in printed


def test_evaluate_bad_usage(panoptic_case, tmp_path, capsys):
    gt_json, gt_dir, pred_json, pred_dir = panoptic_case(["identity"], seed=1, repeats=1)
    assert main(["evaluate", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--pred-json", str(pred_json)]) == 2
    assert "--pred-dir" in capsys.readouterr().err
    # a prediction JSON missing an image: a clear error naming the file, exit status 2
    data = json.loads(pred_json.read_text())
    data["annotations"] = data["annotations"][1:]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(data))
    assert main(["evaluate", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--pred-json", str(short),
                 "--pred-dir", str(pred_dir)]) == 2
    assert "no prediction for the image" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither --pred-json nor (later) --checkpoint
        main(["evaluate", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir)])


def test_evaluate_files_threads_report_a_corrupt_png(panoptic_case, capsys):
    """An error in a worker thread reaches the CLI as exit status 2 naming the file; the bar goes to stderr."""
    gt_json, gt_dir, pred_json, pred_dir = panoptic_case(["shift"], seed=3, repeats=3)
    args = ["evaluate", "--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--pred-json", str(pred_json),
            "--pred-dir", str(pred_dir), "--workers", "2"]
    assert main(args) == 0
    assert "PQ: 100%" in capsys.readouterr().err
    broken = sorted(pred_dir.glob("*.png"))[-1]
    broken.write_bytes(broken.read_bytes()[:60])
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert broken.name in err and "truncated" in err and "PQ:" not in err


def test_evaluate_into_a_closed_pipe_exits_quietly(panoptic_case):
    """Issue 23: `evaluate ... | head` printed "error: [Errno 32] Broken pipe" and exited 2."""
    import subprocess
    import sys

    from panoptic_deeplab.cli import EXIT_BROKEN_PIPE

    gt_json, gt_dir, pred_json, pred_dir = panoptic_case(["shift"], seed=2, repeats=1)
    command = [sys.executable, "-m", "panoptic_deeplab.cli", "evaluate", "--gt-json", str(gt_json), "--gt-dir",
               str(gt_dir), "--pred-json", str(pred_json), "--pred-dir", str(pred_dir), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the table is printed, as `head` after its lines
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert stderr == ""
