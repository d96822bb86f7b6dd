"""Each kind of HTML report, opened from the file system in headless Chromium.

For every page: no console error, no request other than the file itself, every plot a
non-empty SVG with data marks whose screenshot is not blank (it shows coloured marks, not
only axes), and the tables with the rows the report holds. Chromium comes from the
system's packages (``apt-get install -y chromium``; ``.ci/run`` installs it); Playwright
drives it and never downloads a browser of its own. Without Chromium these tests skip,
saying so. With ``ONNXOPT_SCREENSHOTS=folder`` each page is also saved there as a PNG.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import html_pages

CHROMIUM = os.environ.get("ONNXOPT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Chromium is not installed (apt-get install -y chromium): the HTML report's browser "
                "tests need it", allow_module_level=True)
pytest.importorskip("matplotlib", reason="the HTML report needs the 'report' extra (matplotlib)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (the dev extra)")
Image = pytest.importorskip("PIL.Image", reason="the browser tests need pillow (the dev extra)")

from onnxopt.html_report import render_html  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # launch() gives every browser a fresh temporary profile (user data dir)
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Opened:
    """A page loaded from a file, with everything it logged and requested."""

    def __init__(self, browser, path: Path):
        self.url = path.resolve().as_uri()
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(self.url, wait_until="load")

    def rows(self, table: str) -> int:
        return self.page.locator(f"table.{table} tbody tr").count()


def _open(browser, tmp_path: Path, kind: str, data: dict) -> Opened:
    path = tmp_path / f"{kind}.html"
    path.write_text(render_html(data), encoding="utf-8")
    opened = Opened(browser, path)
    shots = os.environ.get("ONNXOPT_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        opened.page.screenshot(path=str(Path(shots) / f"{kind}.png"), full_page=True)
    return opened


def _not_blank(png: bytes) -> tuple[float, int]:
    """(share of non-white pixels, number of strongly coloured pixels) of a screenshot."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)
    inked = int((rgb.min(axis=1) < 235).sum())
    coloured = int((rgb.max(axis=1) - rgb.min(axis=1) > 60).sum())
    return inked / len(rgb), coloured


def _check_plots(opened: Opened) -> int:
    figures = opened.page.locator("figure.plot")
    count = figures.count()
    assert count > 0
    for i in range(count):
        fig = figures.nth(i)
        info = fig.evaluate("""f => {
            const svg = f.querySelector('svg');
            const marks = [...svg.querySelectorAll('[id*="-data-"]')].filter(g =>
                [...g.querySelectorAll('path, use, rect')].some(e => e.tagName !== 'path' || (e.getAttribute('d') || '').length > 4));
            const box = svg.getBoundingClientRect();
            return {id: f.id, marks: marks.length, w: box.width, h: box.height,
                    title: svg.querySelector('title')?.textContent || '', desc: svg.querySelector('desc')?.textContent || '',
                    caption: f.querySelector('figcaption')?.textContent || '', role: svg.getAttribute('role')};
        }""")
        assert info["marks"] > 0, f"{info['id']}: no data marks"
        assert info["w"] > 400 and info["h"] > 80, f"{info['id']}: rendered {info['w']}x{info['h']}"
        assert info["title"] and len(info["desc"]) > 30 and info["role"] == "img", info
        assert info["title"] in info["caption"]
        inked, coloured = _not_blank(fig.locator("svg").screenshot())
        assert inked > 0.01 and coloured > 50, f"{info['id']}: screenshot blank ({inked:.3f}, {coloured})"
    return count


@pytest.mark.parametrize("kind", html_pages.KINDS)
def test_page_in_chromium(browser, tmp_path, kind):
    data = html_pages.report(kind)
    opened = _open(browser, tmp_path, kind, data)
    assert opened.errors == [], f"console errors: {opened.errors}"
    assert opened.requests == [opened.url], f"requests leaving the file: {opened.requests}"
    plots = _check_plots(opened)
    assert opened.rows("passes") == len(data["passes"])
    outputs = data["validation"][0]["outputs"]
    assert opened.rows("fidelity") == len(outputs)
    page = opened.page
    if kind == "exact":
        assert plots == 4 and page.locator(".badge.ok").count() == 1
    if kind == "lossy":
        assert page.locator("#layers figure").count() == 4
    if kind == "search":
        assert opened.rows("trials") == len(data["search"]["trials"])
        assert page.locator("table.trials tr.chosen").count() == 1
        assert page.locator("#search figure#pareto").count() == 1 and page.locator("#finetune figure").count() == 1
    if kind == "failed":
        banner = page.locator(".banner[role=alert]")
        assert banner.is_visible() and "Validation failed" in banner.inner_text()
        first = page.locator("table.fidelity tbody tr").first
        assert "fail" in first.get_attribute("class")
        red = first.locator("td").first.evaluate("td => getComputedStyle(td).color")
        assert red == "rgb(185, 28, 28)"
        # the failure is the first thing on the page, above the model section
        assert banner.bounding_box()["y"] < page.locator("#model").bounding_box()["y"]
    page.emulate_media(media="print")  # printed: nothing wider than the page, plots still drawn
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert page.locator("figure.plot svg").first.bounding_box()["height"] > 80
    page.close()
