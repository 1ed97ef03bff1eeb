"""The report in a real browser: headless Chromium loads it, logs no console error,
renders the contents and the summary, and takes a non-blank screenshot."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from attnlab.report.page import write_report
from tests.report.test_html import synthetic_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")

# console messages (the page has no script: any is a fault) and load errors, as Chromium
# logs them with --enable-logging=stderr (e.g. `INFO:CONSOLE:1] "Uncaught ReferenceError ..."`)
CONSOLE_ERRORS = ("Uncaught", ":CONSOLE", "Refused to", "net::ERR_")


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_chromium_renders_the_report_without_console_errors(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    url = write_report(*synthetic_run(out)).resolve().as_uri()

    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    errors = [ln for ln in dom.stderr.splitlines() if any(e in ln for e in CONSOLE_ERRORS)]
    assert not errors, errors
    html = dom.stdout
    assert '<nav class="toc"' in html and 'href="#summary-of-findings"' in html
    assert html.index('id="summary-of-findings"') < html.index('id="attention-sinks"')
    assert html.count("<img") >= 10 and "<script" not in html

    shot = tmp_path / "report.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    errors = [ln for ln in run.stderr.splitlines() if any(e in ln for e in CONSOLE_ERRORS)]
    assert not errors, errors
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    # not blank: dark text on a light page, and colour from the first figures
    assert (pixels < 0.3).all(axis=-1).mean() > 0.005
    assert np.ptp(pixels, axis=-1).max() > 0.3
