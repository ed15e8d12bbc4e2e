"""A results report of one or more training runs: a Markdown table and PNG plots.

    python -m common.report runs/simclr runs/moco [--out report.md]

For each RUN_DIR it reads `run.json` (what the run was: method, arguments; written when it starts),
`metrics.jsonl` (one record per step: loss, lr, img/s, time; the online kNN monitor's records) and
any evaluation results saved in the folder (the JSON that eval_knn.py / eval_linear.py /
eval_svm.py write with `--output RUN_DIR/<name>.json`). It writes the table (run, method, epochs,
steps, wall time, img/s, last loss, online kNN, kNN / linear / SVM top-1) to --out and one plot
per quantity (loss, lr, online kNN top-1, against the step; one line per run) beside it, drawn
with PIL.
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def read_run(run_dir):
    """{"name", "info" (run.json or {}), "steps" [records], "evals" [online kNN records], "results" {kind: json}}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder (give the --output-dir of a training run).")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: it is not the --output-dir of a training run.")
    steps, evals = [], []
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{metrics}, line {n}, is not JSON.") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{metrics}, line {n}, is not a step record.")
        (evals if "knn_top1" in record else steps).append(record)
    info = {}
    if (run_dir / "run.json").is_file():
        try:
            info = json.loads((run_dir / "run.json").read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{run_dir / 'run.json'} is not JSON.") from None
    results = {}
    for path in sorted(run_dir.glob("*.json")):
        if path.name == "run.json":
            continue
        try:
            d = json.loads(path.read_text().strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            continue  # not an evaluation result
        kind = _kind(d)
        if kind:
            results[kind] = d
    return {"name": run_dir.name, "dir": run_dir, "info": info if isinstance(info, dict) else {}, "steps": steps,
            "evals": evals, "results": results}


def _kind(d):
    """Which evaluation wrote the JSON object d, or None."""
    if not isinstance(d, dict) or not isinstance(d.get("top1", d.get("mAP")), (int, float)):
        return None
    if "fewshot" in d:
        return "fewshot"
    if "temperature" in d and "k" in d:
        return "knn"
    if "protocol" in d:
        return "linear"
    if "classes" in d:
        return "svm"
    return None


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _duration(seconds):
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def summary_row(run):
    steps, info, results = run["steps"], run["info"], run["results"]
    args = info.get("args", {}) if isinstance(info.get("args"), dict) else {}
    rates = [r["img_per_s"] for r in steps if isinstance(r.get("img_per_s"), (int, float)) and r["img_per_s"] == r["img_per_s"]]
    last = steps[-1] if steps else {}
    times = [r["time"] for r in steps + run["evals"] if isinstance(r.get("time"), (int, float))]
    elapsed = max(times) - min(times) if len(times) > 1 else None  # from the first step's end to the last record
    epochs_done = (last.get("epoch", -1) + 1) if steps else 0
    knn = run["evals"][-1]["knn_top1"] if run["evals"] else None
    metric = lambda kind: (results.get(kind) or {}).get("top1", (results.get(kind) or {}).get("mAP"))  # noqa: E731
    return {"run": run["name"], "method": info.get("method", "-"),
            "epochs": f"{epochs_done}/{args['epochs']}" if "epochs" in args else str(epochs_done),
            "steps": last.get("step", 0), "wall": _duration(elapsed), "img_s": statistics.median(rates) if rates else None,
            "loss": last.get("loss"), "online_knn": knn, "knn": metric("knn"), "linear": metric("linear"),
            "svm": metric("svm")}


def table(runs):
    head = ["run", "method", "epochs", "steps", "wall time", "img/s", "last loss", "online kNN", "kNN top-1",
            "linear top-1", "SVM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        r = summary_row(run)
        cells = [r["run"], r["method"], r["epochs"], str(r["steps"]), r["wall"], _fmt(r["img_s"], 0), _fmt(r["loss"], 4),
                 _fmt(r["online_knn"]), _fmt(r["knn"]), _fmt(r["linear"]), _fmt(r["svm"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def line_plot(series, path, title, ylabel, size=(640, 400)):
    """series: [(label, [(x, y)])] -> a PNG line plot at `path`; returns its size. Empty series are left out."""
    series = [(label, [(x, y) for x, y in pts if y is not None and y == y and abs(y) != float("inf")])
              for label, pts in series]
    series = [(label, pts) for label, pts in series if pts]
    image = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, right, top, bottom = 60, 16, 28, 40
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    if not series:
        draw.text((left, size[1] // 2), "no data", fill=(120, 120, 120), font=font)
        image.save(path)
        return image.size
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    w, h = size[0] - left - right, size[1] - top - bottom
    px = lambda x: left + (x - x0) / (x1 - x0) * w  # noqa: E731
    py = lambda y: top + h - (y - y0) / (y1 - y0) * h  # noqa: E731
    for t in yt:
        draw.line([(left, py(t)), (left + w, py(t))], fill=(230, 230, 230))
        draw.text((4, py(t) - 5), f"{t:.4g}", fill=(0, 0, 0), font=font)
    for t in xt:
        draw.line([(px(t), top + h), (px(t), top + h + 4)], fill=(0, 0, 0))
        draw.text((px(t) - 10, top + h + 6), f"{t:.4g}", fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, left + w, top + h], outline=(0, 0, 0))
    draw.text((left + w // 2 - 10, size[1] - 14), "step", fill=(0, 0, 0), font=font)
    draw.text((left + 4, top + 2), ylabel, fill=(90, 90, 90), font=font)
    for i, (label, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(px(x), py(y)) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) <= 50 else []:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.text((left + w - 150, top + 6 + 12 * i), label[:24], fill=colour, font=font)
    image.save(path)
    return image.size


def write_report(run_dirs, out):
    runs = [read_run(d) for d in run_dirs]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    plots = []
    for key, title, ylabel, source in (("loss", "training loss", "loss", "steps"), ("lr", "learning rate", "lr", "steps"),
                                       ("knn_top1", "online kNN top-1 (%)", "top-1", "evals")):
        series = [(r["name"], [(rec["step"], rec.get(key)) for rec in r[source]]) for r in runs]
        if not any(pts for _, pts in series) or not any(v is not None for _, pts in series for _, v in pts):
            continue
        path = Path(f"{stem}_{key}.png")
        line_plot(series, path, title, ylabel)
        plots.append((title, path.name))
    lines = ["# Results", "", table(runs), ""]
    for title, name in plots:
        lines += [f"![{title}]({name})", ""]
    out.write_text("\n".join(lines))
    return out, [name for _, name in plots]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="training runs' --output-dir folders")
    parser.add_argument("--out", default="report.md", help="the Markdown file (plots are written beside it)")
    args = parser.parse_args(argv)
    out, plots = write_report(args.runs, args.out)
    print(f"wrote {out} and {len(plots)} plot(s): {', '.join(plots) or 'none'}")


if __name__ == "__main__":
    from common import cli
    sys.exit(cli.run(main))
