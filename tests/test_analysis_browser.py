"""report.html opened in a real headless Chromium (Debian's chromium + chromium-driver, installed by
scripts/install_browser.sh, which `make test` runs): every image loads and the console stays clean.

Skipped only when Chromium is absent and PEFTLAB_REQUIRE_BROWSER is unset (CI sets it, so a
missing browser fails there instead of passing silently). The screenshot is kept as a test
artifact under tests/artifacts/ (path printed).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _browser_or_skip():
    present = Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()
    if not present:
        if os.environ.get("PEFTLAB_REQUIRE_BROWSER"):
            pytest.fail(f"PEFTLAB_REQUIRE_BROWSER is set but {CHROMIUM} / {CHROMEDRIVER} are missing: run scripts/install_browser.sh")
        pytest.skip("Chromium not installed (bash scripts/install_browser.sh); set PEFTLAB_REQUIRE_BROWSER=1 to make this a failure")
    try:
        import selenium  # noqa: F401
    except ImportError:
        if os.environ.get("PEFTLAB_REQUIRE_BROWSER"):
            pytest.fail("PEFTLAB_REQUIRE_BROWSER is set but selenium is not installed (pip install -e '.[dev]')")
        pytest.skip("selenium not installed (pip install -e '.[dev]')")


def test_report_renders_in_headless_chromium(tmp_path):
    _browser_or_skip()
    import analysis_fixtures as F
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from peftlab.analysis import analyze

    study = F.make_subspace_study(tmp_path / "study", dims=(1000,))
    F.make_budget_study(tmp_path / "study" / "budget")  # a second family in the same report
    res = analyze(tmp_path / "study")
    assert res.report == tmp_path / "study" / "analysis" / "report.html"
    expected_images = len(res.plots)
    assert expected_images >= 8

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager reach for the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1280,2000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(res.report.as_uri())
        assert "peftlab analysis" in driver.title
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(images) == expected_images
        broken = [alt for alt, complete, w, h in images if not complete or w == 0 or h == 0]
        assert not broken, f"images that did not load: {broken}"
        external = driver.execute_script(
            "return Array.from(document.querySelectorAll('[src]')).map(e => e.getAttribute('src'))"
            ".filter(s => !s.startsWith('data:'));")
        assert external == []  # self-contained: nothing to fetch
        text = driver.find_element("tag name", "body").text
        assert "H2 learned gates differ from 0.5" in text and "Summary (mean ± std over seeds)" in text
        errors = [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
        assert not errors, errors
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "analysis_report.png"
        driver.save_screenshot(str(shot))
        shutil.copy(res.report, ARTIFACTS / "analysis_report.html")
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
    assert study.is_dir()
