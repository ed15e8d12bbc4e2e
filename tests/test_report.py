"""python -m common.report: the table and plots of one or more runs, and one sentence for bad input."""
import json

from PIL import Image

from common import report
from tests.helpers import run_script


def fake_run(path, method, losses, knn=(), evals=None):
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"method": method, "args": {"epochs": 3}}))
    records = [{"step": i + 1, "epoch": i // 2, "loss": loss, "lr": 0.1 * (i + 1), "img_per_s": 100.0 + i,
                "time": 1000.0 + 10 * i} for i, loss in enumerate(losses)]
    records += [{"step": step, "epoch": 0, "knn_top1": top1, "knn_top5": 90.0, "time": 1000.0 + step}
                for step, top1 in knn]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name, d in (evals or {}).items():
        (path / name).write_text(json.dumps(d) + "\n")


def test_report_table_and_plots(tmp_path):
    fake_run(tmp_path / "a", "simclr", [5.0, 4.5, 4.0, 3.5], knn=[(2, 20.0), (4, 30.5)],
             evals={"knn.json": {"top1": 41.25, "top5": 88.0, "k": 20, "temperature": 0.07},
                    "linear.json": {"top1": 52.5, "protocol": "small"},
                    "notes.json": {"something": "else"}})
    fake_run(tmp_path / "b", "moco", [6.0, 5.5])
    proc = run_script("-m", "common.report", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "out" / "r.md")
    assert "3 plot(s)" in proc.stdout
    text = (tmp_path / "out" / "r.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert rows[0] == "| a | simclr | 2/3 | 4 | 0:00:30 | 102 | 3.5000 | 30.50 | 41.25 | 52.50 | - |"
    assert rows[1] == "| b | moco | 1/3 | 2 | 0:00:10 | 100 | 5.5000 | - | - | - | - |"
    for key in ("loss", "lr", "knn_top1"):
        assert f"](r_{key}.png)" in text
        assert Image.open(tmp_path / "out" / f"r_{key}.png").size == (640, 400)


def test_line_plot_draws_each_series_in_its_colour(tmp_path):
    report.line_plot([("up", [(0, 0.0), (10, 1.0)]), ("flat", [(0, 0.5), (10, 0.5)])], tmp_path / "p.png", "t", "y")
    colours = {c for _, c in Image.open(tmp_path / "p.png").convert("RGB").getcolors(1 << 20)}
    assert report.COLOURS[0] in colours and report.COLOURS[1] in colours


def test_report_of_a_folder_that_is_not_a_run_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_script("-m", "common.report", tmp_path / "empty", "--out", tmp_path / "r.md", check=False)
    assert proc.returncode == 2
    assert "has no metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("-m", "common.report", tmp_path / "missing", check=False)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
