"""qlora report: every series of metrics.jsonl drawn, a valid PNG or self-contained HTML, runs overlaid."""

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
from matplotlib import image

from qlora.errors import UserError
from qlora.report import SERIES, figure, read_run, report, series

RECORDS = [
    {"step": 0, "pass@1": 0.25, "passed": 1, "samples": 4, "eval_seconds": 3.0},
    {"step": 1, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": None, "tokens_per_second": 10.0, "tokens_seen": 5},
    {"step": 2, "eval_loss": 1.9},
    {"step": 2, "loss": 1.5, "learning_rate": 2e-4, "grad_norm": 0.5, "tokens_per_second": 12.0, "tokens_seen": 9},
]


def test_series_are_every_metric_logged_without_gaps():
    found = series(RECORDS)
    assert set(found) == {key for key, _ in SERIES}
    assert found["loss"] == ([1, 2], [2.0, 1.5])
    assert found["eval_loss"] == ([2], [1.9])
    assert found["pass@1"] == ([0], [0.25])
    assert found["grad_norm"] == ([2], [0.5])  # a null is not a point


def test_png_and_html_reports_of_a_run_and_of_two(memorised_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(memorised_run, run)
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({"pass@1": 1.0, "base": {"pass@1": 0.0}}))
    path, summaries = report([run], None)
    assert path == run / "report.png"
    height, width, _ = image.imread(path).shape
    assert width > 1000 and height > 300
    assert summaries[0]["steps"] == 100 and summaries[0]["pass@1"] == "1.000"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert summaries[0]["last train loss"] == f"{last['loss']:.4f}"

    fig = figure([read_run(run)])
    model = read_run(run)["recipe"].model.name_or_path
    assert fig.get_suptitle() == f"qlora report: run ({model})"  # which run, of which model, is on the page
    assert all(ax.has_data() or ax.texts for ax in fig.axes)  # no empty panel

    page, _ = report([run, memorised_run], tmp_path / "both.html")
    text = page.read_text()
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text).group(1))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert text.count("<table>") == 2 and "pass@1" in text

    # run again, each report is replaced; a file qlora did not write at --output is refused and left as it is
    assert report([run], None)[0] == path and report([run, memorised_run], page)[0] == page
    for name, content in (("theirs.png", path.read_bytes().replace(b"qlora report", b"their report")),
                          ("notes.html", b"<html>my notes</html>")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=f"--output: {tmp_path / name} exists and is not a report qlora wrote"):
            report([run], tmp_path / name)
        assert (tmp_path / name).read_bytes() == content


@pytest.mark.parametrize("keys, grid", [
    (["loss", "learning_rate", "grad_norm", "tokens_per_second"], (2, 2)),  # was 2 x 3 with two empty slots
    (["loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second"], (2, 3)),  # the summary in the 6th
    (["loss"], (1, 1)),
])
def test_no_panel_is_empty(keys, grid):
    from qlora.config import load_recipe

    records = [{"step": s, **{k: 1.0 / s for k in keys}} for s in (1, 2, 3)]
    fig = figure([{"name": "demo", "recipe": load_recipe(Path(__file__).parents[1] / "configs" / "tiny-code.yaml"),
                   "records": records, "eval": None, "best": None}])
    assert fig.axes[0].get_subplotspec().get_gridspec().get_geometry() == grid
    assert all(ax.has_data() or ax.texts for ax in fig.axes)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(keys) == 5 and "steps: 3" in texts[0] or not texts


@pytest.mark.parametrize("output, message", [
    (None, "--output is needed with several runs"),
    ("r.pdf", "--output r.pdf: name a .png or .html file"),
])
def test_report_output_is_checked(memorised_run, output, message):
    with pytest.raises(UserError, match=re.escape(message)):
        report([memorised_run, memorised_run], output and Path(output))
