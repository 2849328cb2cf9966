"""`tunesmith report`: one self-contained page (no request leaves the file), with the
evaluation table, curves, data report, review summary and samples that filter and search, in
headless Chromium."""

from __future__ import annotations

import json

import pytest
from helpers.pages import browser, write_run  # noqa: F401 - browser: a fixture
from helpers.runs import run_cli

from tunesmith.judge.data_report import DataReport, Finding, SourceReport
from tunesmith.judge.review import Review, a_on_left
from tunesmith.judge.run_report import render_report


def _data_report() -> dict:
    source = SourceReport(
        path="train.jsonl",
        split="train",
        format="chat",
        records=3,
        samples=3,
        tokens=30,
        trained_tokens=9,
        truncated=0,
        split_long=0,
        dropped_too_long=0,
        dropped_untrained=0,
        dropped_empty_response=0,
        out_of_order=0,
        prompt_lengths=[5, 6, 7],
        answer_lengths=[3, 3, 3],
    )
    finding = Finding(
        "duplicates_exact",
        1,
        1,
        "groups of identical training records",
        ["train.jsonl, line 1 = train.jsonl, line 3"],
    )
    return DataReport("run.yaml", 64, "truncate", 0.8, [source], [finding], 3, 9, 0).to_json()


@pytest.mark.slow  # another tool's run: once in .ci/run, at the newest transformers
def test_the_report_page_in_a_browser(tmp_path, browser):  # noqa: F811
    out = write_run(tmp_path / "run")
    (out / "data_report.json").write_text(json.dumps(_data_report()))
    review = Review(out, "base", "tuned")
    for item in review.items:
        review.vote("ann", item.index, item.key, "right" if a_on_left("ann", item) else "left")
    result = run_cli("report", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out / 'report.html'}"
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((out / "report.html").as_uri())
    assert requests == [(out / "report.html").as_uri()]  # nothing else is fetched
    rows = page.locator("#eval-table tbody tr")
    assert rows.nth(0).inner_text().split("\t") == ["perplexity", "4255.90", "1.22"]
    assert rows.nth(1).inner_text().split("\t") == ["exact match (n=6)", "33.3%", "83.3%"]
    assert "accuracy" not in page.inner_text("#eval-table")  # None in both columns
    assert page.locator("svg").count() >= 3  # loss, lr, the data report's lengths
    assert "1 groups of identical training records" in page.inner_text("body")
    assert "tuned wins 100% of decisive votes" in page.inner_text("body")
    assert page.text_content("#count") == "6 of 6 samples"
    page.select_option("#filter", "tuned:wrong")
    assert page.text_content("#count") == "1 of 6 samples"
    assert page.locator("#samples tbody tr").first.get_attribute("data-index") == "5"
    page.select_option("#filter", "base:right")
    assert page.text_content("#count") == "2 of 6 samples"
    page.select_option("#filter", "differ")
    assert page.text_content("#count") == "5 of 6 samples"
    page.select_option("#filter", "all")
    page.fill("#search", "colour")
    assert page.text_content("#count") == "1 of 6 samples"
    assert page.locator("#samples tbody tr").first.get_attribute("data-index") == "3"
    assert "r: 16" in page.inner_text("#config + pre")


def test_the_report_names_what_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("report", str(empty))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"{empty}: holds no run (no config.yaml, metrics.jsonl, eval.json or sweep/trials.csv); "
        "give a run's output_dir or a `tunesmith eval --save` folder"
    )
    (empty / "config.yaml").write_text("method: {name: lora}\n")
    text = render_report(empty)  # only a config: the page says what is not there
    assert "no metrics.jsonl" in text and "no eval.json" in text and "no samples.jsonl" in text


def _damage(out) -> None:
    """Every kind of damage at once: a torn last line and a line of another shape in
    samples.jsonl, a torn review line and one without a reviewer, a binary eval.json, a list as
    summary.json, a data report of another shape, an Infinity loss and a step given as text."""
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"index": 9, "answers": {"base": "x"}}\n{"index": 7, "mess')
    (out / "review.jsonl").write_text(
        '{"item": 0, "key": "k", "vote": "a"}\n{"reviewer": "ann", "item": 0, "ke'
    )
    (out / "eval.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (out / "summary.json").write_text("[1, 2]")
    (out / "data_report.json").write_text('{"sources": 3}')
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "loss": Infinity, "lr": 0.0}\n{"step": "41", "loss": 0.1}\n')


def test_every_damaged_input_gives_one_line_naming_file_and_line(tmp_path):
    out = write_run(tmp_path / "run")
    _damage(out)
    result = run_cli("report", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: {out / 'summary.json'}: not a JSON object; left out of the report",
        f"warning: {out / 'metrics.jsonl'}, line 41: loss is inf; left out",
        f"warning: {out / 'metrics.jsonl'}, line 42: 'step' is not an integer; left out",
        f"warning: {out / 'eval.json'}: not UTF-8 text (a binary file?); left out of the report",
        f"warning: {out / 'data_report.json'}: not a tunesmith data report: 'sources' is not a "
        "list; left out of the report",
        f"warning: {out / 'samples.jsonl'}, line 7: no 'messages'; left out",
        f"warning: {out / 'samples.jsonl'}, line 8: a torn last line (cut short by a crash?); "
        "left out",
        f"warning: {out / 'review.jsonl'}, line 1: no 'reviewer'; left out",
        f"warning: {out / 'review.jsonl'}, line 2: a torn last line (cut short by a crash?); "
        "left out",
    ]
    html = (out / "report.html").read_text()
    assert "Samples (6)" in html and "no eval.json" in html
    review = run_cli("review", str(out), "--summary")
    assert review.returncode == 0 and review.stdout.startswith("all reviewers: 0 votes")
    assert review.stderr.splitlines() == [
        f"warning: {out / 'samples.jsonl'}, line 7: no 'messages'; left out",
        f"warning: {out / 'samples.jsonl'}, line 8: a torn last line (cut short by a crash?); "
        "left out",
        f"warning: {out / 'review.jsonl'}, line 1: no 'reviewer'; left out",
        f"warning: {out / 'review.jsonl'}, line 2: a torn last line (cut short by a crash?); "
        "left out",
    ]


def test_the_inline_json_cannot_end_the_script_early(tmp_path):
    out = write_run(tmp_path / "run")
    lines = (out / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["answers"]["tuned"] = "<!--<script>alert(1)</script>&amp;"
    lines[0] = json.dumps(record)
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    html = render_report(out)
    block = html.split('id="samples-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block and ">" not in block and "&" not in block
    assert json.loads(block)[0]["answers"]["tuned"] == "<!--<script>alert(1)</script>&amp;"
