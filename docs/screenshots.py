"""The README's screenshots of `tunesmith report` and `tunesmith review`, taken in Debian's
headless Chromium through Playwright, from a run's output folder (copied first: the votes the
review screenshot casts stay in the copy).

    python docs/screenshots.py outputs/quickstart  # docs/report.png, report-samples.png, review.png
    python docs/screenshots.py --sweep outputs/sweep  # docs/report-sweep.png (tunesmith sweep)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from tunesmith.io import atomic_write_text
from tunesmith.judge.review import Review
from tunesmith.judge.review_app import build_review_app
from tunesmith.judge.run_report import render_report
from tunesmith.serve.runner import serve_in_thread

DOCS = Path(__file__).resolve().parent


def main(output_dir: str) -> None:
    source = Path(output_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the pages show the folder as given, relative
        run = Path(output_dir)
        skip = shutil.ignore_patterns("checkpoints", "review.jsonl")
        shutil.copytree(source, run, ignore=skip)
        page_file = atomic_write_text(render_report(run), run / "report.html")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1100, "height": 1500})
            page.goto(page_file.resolve().as_uri())
            page.evaluate("document.getElementById('evaluation').scrollIntoView()")
            page.screenshot(path=str(DOCS / "report.png"))
            page.select_option("#filter", "tuned:wrong")
            page.evaluate("document.getElementById('samples-title').scrollIntoView()")
            page.screenshot(path=str(DOCS / "report-samples.png"))
            review = Review(run, "base", "tuned")
            with serve_in_thread(build_review_app(review)) as url:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(f"{url}/?reviewer=ann")
                page.wait_for_selector("#left:not(:empty)")
                for key in ("1", "2", "3"):
                    before = page.text_content("#progress")
                    page.keyboard.press(key)
                    page.wait_for_function(
                        f"document.querySelector('#progress').textContent != {before!r}"
                    )
                page.screenshot(path=str(DOCS / "review.png"))
            browser.close()
    print(f"wrote {DOCS / 'report.png'}, {DOCS / 'report-samples.png'}, {DOCS / 'review.png'}")


def sweep(output_dir: str) -> None:
    """The sweep section of `tunesmith report` on a `tunesmith sweep` folder."""
    source = Path(output_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        run = Path(output_dir)
        shutil.copytree(source, run, ignore=shutil.ignore_patterns("trials", "logs", "*.db"))
        page_file = atomic_write_text(render_report(run), run / "report.html")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            page.goto(page_file.resolve().as_uri())
            page.screenshot(path=str(DOCS / "report-sweep.png"))
            browser.close()
    print(f"wrote {DOCS / 'report-sweep.png'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sweep"]:
        sweep(sys.argv[2] if len(sys.argv) > 2 else "outputs/sweep")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "outputs/quickstart")
