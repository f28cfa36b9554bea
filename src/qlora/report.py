"""`qlora report RUN... [--output FILE.png|FILE.html]`: a run's curves and summary, several runs overlaid."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from qlora.config import load_recipe
from qlora.errors import UserError
from qlora.files import check_parent, output_lock, write_atomic
from qlora.rundir import METRICS_FILE, RECIPE_FILE, read_best, read_eval_summary
from qlora.runfiles import read_metrics

# in every report written (PNG "Software" text, HTML "generator" meta): the only files --output replaces
MARK = "qlora report"
HTML_MARK = f"<meta name='generator' content='{MARK}'>"
# (metrics.jsonl key, plot title), in the order drawn
SERIES = (("loss", "train loss"), ("eval_loss", "eval loss"), ("pass@1", "pass@1 (train.eval_problems)"),
          ("learning_rate", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_second", "tokens/s"))


def read_run(run: Path) -> dict[str, Any]:
    """The run's recipe, metrics.jsonl records and, when present, its eval summary and best.json."""
    if not (run / RECIPE_FILE).is_file() or not (run / METRICS_FILE).is_file():
        raise UserError(f"{run}: not a qlora run with metrics (needs {RECIPE_FILE} and {METRICS_FILE})")
    records = read_metrics(run / METRICS_FILE, "fix or delete that line")
    return {"name": run.resolve().name, "recipe": load_recipe(run / RECIPE_FILE), "records": records,
            "eval": read_eval_summary(run), "best": read_best(run)}


def series(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Each metric present in the records: (steps, values), non-null values only."""
    found = {}
    for key, _ in SERIES:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            found[key] = ([s for s, _ in points], [v for _, v in points])
    return found


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """Recipe highlights and what the run did."""
    recipe, records = run["recipe"], run["records"]
    train = [r for r in records if r.get("loss") is not None]
    eval_losses = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    times = [r["time"] for r in train if r.get("time") is not None]
    facts = {
        "model": recipe.model.name_or_path,
        "lora": f"r={recipe.lora.r}, alpha={recipe.lora.alpha:g}, {recipe.lora.target_modules}",
        "learning rate": f"{recipe.train.learning_rate:g} ({recipe.train.lr_scheduler})",
        "batch": f"{recipe.train.batch_size} x {recipe.train.grad_accum}",
        "steps": train[-1]["step"] if train else 0,
        "tokens": f"{train[-1].get('tokens_seen') or 0:,}" if train else "0",
        "last train loss": f"{train[-1]['loss']:.4f}" if train else "n/a",
        "best eval loss": f"{min(eval_losses):.4f}" if eval_losses else "n/a",
        **pass_at_1_facts(run),
        "wall clock": f"{(times[-1] - times[0]) / 60:.1f} min between the first and last log" if len(times) > 1
        else "n/a",
    }
    if run["eval"]:
        facts.update({k: f"{v:.3f}" for k, v in run["eval"].items() if k.startswith("pass@")})
    return facts


def summary_lines(runs: list[dict[str, Any]]) -> list[str]:
    """The summary as text lines: every fact of one run, the outcome of each of several."""
    if len(runs) == 1:
        return [f"{key}: {value}" for key, value in summary(runs[0]).items() if key != "model"]
    return [f"{run['name']}: {facts['steps']} steps, last train loss {facts['last train loss']}, best eval loss "
            f"{facts['best eval loss']}" for run in runs for facts in [summary(run)]]


def pass_at_1_facts(run: dict[str, Any]) -> dict[str, str]:
    """With train.eval_problems: the base's pass@1 (step 0), the best and the last."""
    points = [(r["step"], r["pass@1"]) for r in run["records"] if r.get("pass@1") is not None]
    if not points:
        return {}
    best = max(points[1:] if points[0][0] == 0 and len(points) > 1 else points, key=lambda p: p[1])
    facts = {"base pass@1": f"{points[0][1]:.3f}" if points[0][0] == 0 else "n/a",
             "best pass@1": f"{best[1]:.3f} at step {best[0]}", "last pass@1": f"{points[-1][1]:.3f}"}
    if run["best"]:
        facts["adapter/"] = f"checkpoint-{run['best']['step']} (best {run['best']['metric']})"
    return facts


def mark_base_and_best(ax, run: dict[str, Any], steps: list[int], values: list[float]) -> None:
    """On the pass@1 panel: the base (step 0) and the checkpoint published as adapter/ by keep_best: pass@1."""
    if steps[0] == 0:
        ax.annotate("base", (0, values[0]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    best = run["best"]
    if best and best["metric"] == "pass@1" and best["step"] in steps:
        ax.plot([best["step"]], [values[steps.index(best["step"])]], marker="*", markersize=12, linestyle="none",
                color=ax.lines[-1].get_color())
        ax.annotate("best: adapter/", (best["step"], values[steps.index(best["step"])]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)


def figure(runs: list[dict[str, Any]]):
    """One panel per metric any run has, each run a line (and pass@k as bars when evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    drawn = [(key, title) for key, title in SERIES if any(key in series(r["records"]) for r in runs)]
    evaluated = [r for r in runs if r["eval"]]
    panels = len(drawn) + bool(evaluated)
    if not panels:
        raise UserError(f"{', '.join(r['name'] for r in runs)}: metrics.jsonl holds no logged step yet")
    columns = 2 if panels == 4 else min(3, panels)  # 4 panels in 2 x 2, not 3 + 1 and two empty slots
    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (key, title) in zip(flat, drawn):
        for run in runs:
            if key in (points := series(run["records"])):
                ax.plot(*points[key], marker="o" if len(points[key][0]) < 30 else None, markersize=3,
                        label=run["name"])
                if key == "pass@1":
                    mark_base_and_best(ax, run, *points[key])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if key == "pass@1":
            ax.set_ylim(-0.05, 1.1)
    if evaluated:
        ax = flat[len(drawn)]
        keys = sorted({k for r in evaluated for k in r["eval"] if k.startswith("pass@")})
        width = 0.8 / (2 * len(evaluated))
        for i, run in enumerate(evaluated):
            for j, (label, values) in enumerate([(run["name"], run["eval"]),
                                                 (f"{run['name']} base", run["eval"].get("base") or {})]):
                offset = (2 * i + j) * width
                ax.bar([x + offset for x in range(len(keys))], [values.get(k, 0) for k in keys], width, label=label)
        ax.set_xticks([x + (2 * len(evaluated) - 1) * width / 2 for x in range(len(keys))], keys)
        ax.legend(fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("pass@k (qlora eval)")
    for ax in flat[panels:]:  # a slot left over holds the summary, not an empty frame
        ax.axis("off")
        ax.text(0, 1, "\n".join(summary_lines(runs)), va="top", fontsize=8, family="monospace",
                transform=ax.transAxes)
    if len(runs) > 1:
        flat[0].legend(fontsize=8)
    fig.suptitle("qlora report: " + ", ".join(f"{r['name']} ({r['recipe'].model.name_or_path})" for r in runs),
                 fontsize=10)
    fig.tight_layout()
    return fig


def png_bytes(runs: list[dict[str, Any]]) -> bytes:
    from matplotlib import pyplot as plt

    fig = figure(runs)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": MARK})
    plt.close(fig)
    return buffer.getvalue()


def html_report(runs: list[dict[str, Any]]) -> str:
    """A self-contained page: the figure inlined as PNG and each run's summary as a table."""
    image = base64.b64encode(png_bytes(runs)).decode()
    tables = []
    for run in runs:
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in summary(run).items())
        tables.append(f"<h2>{html.escape(run['name'])}</h2><table>{rows}</table>")
    names = ", ".join(html.escape(r["name"]) for r in runs)
    return (f"<!doctype html><html><head><meta charset='utf-8'>{HTML_MARK}<title>qlora report: {names}</title>"
            "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}"
            "img{max-width:100%}</style></head>"
            f"<body><h1>qlora report: {names}</h1><img alt='training curves' src='data:image/png;base64,{image}'>"
            f"{''.join(tables)}</body></html>\n")


def is_report(path: Path) -> bool:
    """Whether the file at `path` is a report this command wrote (it carries MARK)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return (b"Software\0" + MARK.encode()) in data if path.suffix == ".png" else HTML_MARK.encode() in data


def report(run_dirs: list[Path], output: Path | None) -> tuple[Path, list[dict[str, Any]]]:
    """Write the report (PNG or HTML, told by the suffix; default RUN/report.png for one run) and return the
    path and the runs' summaries."""
    if output is None:
        if len(run_dirs) > 1:
            raise UserError("--output is needed with several runs: name a .png or .html file")
        output = run_dirs[0] / "report.png"
    if output.suffix not in (".png", ".html"):
        raise UserError(f"--output {output}: name a .png or .html file")
    check_parent(output, "--output")
    if output.is_dir() or output.exists() and not is_report(output):
        raise UserError(f"--output: {output} exists and is not a report qlora wrote, so it is not replaced; name "
                        "another file or move it away")
    runs = [read_run(run) for run in run_dirs]
    with output_lock(output, "report", "--output"):
        write_atomic(output, png_bytes(runs) if output.suffix == ".png" else html_report(runs))
    return output, [summary(r) | {"run": r["name"]} for r in runs]
