"""plot-run: every panel drawn from a metrics file, bad input refused."""

import json

import cv2
import numpy as np

from pipeline.cli import plot_app
from pipeline.tools.plots import plot_run
from tests.conftest import assert_one_line_error, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLUE, ORANGE, GREEN, RED, PURPLE = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)


def _write_metrics(path, evals=True, ranks=2):
    """Records in the shape train-stream writes: steps every 10, an eval per epoch, a summary."""
    rng = np.random.default_rng(0)
    lines = []
    for step in range(10, 201, 10):
        epoch = 1 + (step - 1) // 50
        per_rank = [float(40 + 5 * rng.random()) for _ in range(ranks)]
        lines.append({"kind": "step", "step": step, "epoch": epoch, "loss": 3.9 * 0.99**step, "lr": 1e-3 * (1 - step / 200),
                      "clips_per_s": sum(per_rank), "clips_per_s_rank": per_rank, "data_wait": 0.3 - step / 1000,
                      "step_time": 0.2})  # fmt: skip
        if evals and step % 50 == 0:
            lines.append({"kind": "eval", "step": step, "epoch": epoch, "top1": step / 250, "top5": step / 210,
                          "per_class": {"clap": 0.5, "dive": None}, "clips": 56})  # fmt: skip
    lines.append({"kind": "summary", "top1": 0.8 if evals else None, "top5": 0.95 if evals else None, "clips_per_s": 85.0,
                  "data_wait": 0.2, "wall_s": 61.0, "steps": 200, "epochs": 4})  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _quadrants(png):
    h, w = png.shape[:2]
    return {
        "loss": png[: h // 2, : w // 2],
        "accuracy": png[: h // 2, w // 2 :],
        "speed": png[h // 2 :, : w // 2],
        "wait": png[h // 2 :, w // 2 :],
    }


def _has_colour(img, rgb):
    return int((np.abs(img.astype(int) - rgb).sum(axis=2) < 30).sum())


def test_plot_run_draws_every_panel_from_a_metrics_file(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run)
    result = run_cli(plot_app, run)
    assert result.exit_code == 0, result.output
    path = run / "curves.png"
    assert result.stdout.strip() == f"wrote {path}"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    png = cv2.imread(str(path))[..., ::-1]
    assert png.shape == (750, 1200, 3)
    q = _quadrants(png)
    assert _has_colour(q["loss"], BLUE) > 200
    assert _has_colour(q["accuracy"], GREEN) > 100 and _has_colour(q["accuracy"], ORANGE) > 100
    assert _has_colour(q["speed"], RED) > 200
    assert _has_colour(q["wait"], PURPLE) > 200
    assert not _has_colour(q["wait"], RED) and not _has_colour(q["loss"], GREEN)


def test_plot_run_without_evals_and_with_a_line_being_written(tmp_path):
    run = tmp_path / "run"
    _write_metrics(run, evals=False, ranks=1)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 21')  # a live run mid-write
    out = plot_run(run, tmp_path / "plots" / "c.png")
    assert out == tmp_path / "plots" / "c.png"
    q = _quadrants(cv2.imread(str(out))[..., ::-1])
    assert _has_colour(q["loss"], BLUE) > 200
    assert not _has_colour(q["accuracy"], GREEN), "no evaluation, no accuracy curve"


def test_plot_run_bad_arguments(tmp_path):
    assert_one_line_error(run_cli(plot_app, tmp_path / "missing"), "run folder not found")
    assert_one_line_error(run_cli(plot_app, tmp_path), "no metrics.jsonl in")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\nnot json\n{"kind": "step"}\n')
    assert_one_line_error(run_cli(plot_app, tmp_path), r"metrics\.jsonl:2: not a JSON line")
    (tmp_path / "metrics.jsonl").write_text("")
    assert_one_line_error(run_cli(plot_app, tmp_path), "no step or eval records")
