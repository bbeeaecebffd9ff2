"""The page of ``dermcam serve`` in headless Chromium (Playwright pointed at the system's browser, no download).

A real server process with a tiny checkpoint; images uploaded through the page's file input; the
probabilities the page shows must be the API's, the overlay must have loaded, the arrow keys must step
through the list, and the console must stay free of errors (a Content-Security-Policy violation is one).
Skipped, not failed, where Chromium or Playwright is missing (Debian: apt-get install chromium;
pip install playwright, without 'playwright install').
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'dermcam[serve]'")
from test_serve import checkpoint, explain_checkpoint, multipart, photo_bytes, start_server  # noqa: E402,F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: "
                                                            "apt-get install chromium; .ci/run installs it)")


def api_answer(url: str, name: str, data: bytes) -> dict:
    body, kind = multipart(name, data)
    request = urllib.request.Request(url + "v1/predict", data=body, headers={"Content-Type": kind})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["images"][0]


@needs_browser
@pytest.mark.slow
def test_the_page_shows_what_the_api_answers(checkpoint: str, tmp_path: Path) -> None:  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    first, second = tmp_path / "lesion one.jpg", tmp_path / "lesion two.png"
    first.write_bytes(photo_bytes((120, 90), 7))
    second.write_bytes(photo_bytes((80, 80), 8, "PNG"))
    proc, url = start_server(checkpoint)
    try:
        expected = [api_answer(url, p.name, p.read_bytes()) for p in (first, second)]
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(url)
            page.wait_for_selector("#card dd")
            assert "c0ffee:0" in page.inner_text("#card") and "mel is decided whenever" in page.inner_text("#card")
            assert "not a medical device, not for diagnosis" in page.inner_text("header")
            page.set_input_files("#files", [str(first), str(second)])
            page.wait_for_function("() => [...document.querySelectorAll('#list li')]"
                                   ".every(li => li.className === 'done')")
            for index, answer in enumerate(expected):
                if index:
                    page.keyboard.press("ArrowDown")
                assert page.inner_text("#name") == (first, second)[index].name
                page.wait_for_function("() => { const i = document.getElementById('overlay'); "
                                       "return i.complete && i.naturalWidth > 0; }")  # a function: no eval (CSP)
                rows = page.eval_on_selector_all(
                    "#bars .row", "rows => rows.map(r => [r.dataset.class, Number(r.dataset.probability), "
                                  "r.querySelector('.value').textContent])")
                assert {name: p for name, p, _ in rows} == answer["probabilities"]
                assert [text for _, _, text in rows] == [f"{100 * p:.1f}%" for _, p, _ in rows]
                assert f"Decision: {answer['decision']}" in page.inner_text("#decision")
                assert answer["operating_point"] in page.inner_text("#point")
            page.keyboard.press("ArrowUp")
            assert page.inner_text("#name") == first.name
            page.keyboard.press("c")
            assert page.eval_on_selector("#overlay", "i => i.style.opacity") == "0"
            browser.close()
        assert problems == []
    finally:
        proc.kill()
        proc.communicate()
