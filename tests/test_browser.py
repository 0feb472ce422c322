"""The explorer page in real headless Chromium (Debian's chromium + chromedriver, driven by selenium).

Skipped where Chromium is not installed, unless PWEMOE_REQUIRE_BROWSER=1 (.ci/run installs it and
sets that). PWEMOE_SCREENSHOT_DIR, if set, also receives the screenshot (the README's picture).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.serving import call, running

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def run3(text_setup, tmp_path_factory) -> Path:
    """A tiny run with k = 3 (the ternary picker), trained and evaluated on the M = 3 grid."""
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train

    root, base = text_setup
    tmp = tmp_path_factory.mktemp("browserrun")
    third = {**base["tasks"][0], "name": "polarity2"}
    cfg = {
        **base,
        "tasks": base["tasks"] + [third],
        "run_dir": str(tmp / "run"),
        "train": {**base["train"], "steps": 8},
    }
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = Path(train(tmp / "c.yaml", []))
    evaluate_run(run, grid=3, verbose=-1)
    return run


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        if os.environ.get("PWEMOE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PWEMOE_REQUIRE_BROWSER=1 but {missing} missing (apt-get install chromium chromium-driver)")
        pytest.skip(f"no browser: {missing}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1500",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        # offline proof: every host but the test server resolves to nothing
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, script: str, timeout: float = 30.0):
    end = time.time() + timeout
    while time.time() < end:
        v = driver.execute_script(script)
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def _lambda_table(driver) -> list[list[float]]:
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#lambda-table tr')].slice(1)"
        ".map(tr => [...tr.querySelectorAll('td')].slice(1).map(td => parseFloat(td.textContent)))"
    )
    return rows


def test_explorer_page_offline_pick_routing_evaluate_export(run3, browser, tmp_path):
    from pwemoe import PreferenceModel
    from pwemoe.serve.app import create_app

    model = PreferenceModel(run3, cache_size=2)
    with running(create_app(model)) as url:
        browser.get(url + "/")
        _wait(browser, "return document.body.dataset.lambdaFor")
        assert browser.execute_script("return document.body.dataset.lambdaFor") == "0.333333,0.333333,0.333333"
        plots = browser.execute_script("return document.querySelectorAll('.js-plotly-plot').length")
        assert plots >= 4  # simplex picker, routing heat map, two pairwise-plane figures
        assert "3 tasks" in browser.find_element("id", "run-info").text

        # a slider: task 0 to 0.7, the others follow on the simplex (0.15 each)
        browser.execute_script(
            "const e = document.getElementById('rn-0'); e.value = '0.7'; e.dispatchEvent(new Event('change'))"
        )
        _wait(browser, "return document.body.dataset.lambdaFor === '0.7,0.15,0.15'")
        _, api = call(url + "/api/routing_weights", {"preference": [0.7, 0.15, 0.15]})
        want = [[round(x, 4) for x in v] for v in api["routing_weights"].values()]
        assert _lambda_table(browser) == want
        assert browser.find_element("id", "current-preference").text == "(0.700, 0.150, 0.150)"
        assert "PWEMoE" in browser.find_element("id", "nearest").text

        # a real mouse click on a point of the simplex picker's grid
        from selenium.webdriver import ActionChains

        points = browser.find_elements("css selector", "#simplex .scatterlayer .trace:nth-last-child(2) .point")
        assert len(points) == 231
        target = points[40]
        ActionChains(browser).move_to_element(target).pause(0.5).move_by_offset(1, 0).pause(0.5).click().perform()
        picked = _wait(browser, "const v = document.body.dataset.lambdaFor; return v !== '0.7,0.15,0.15' && v")
        r = [float(x) for x in picked.split(",")]
        assert abs(sum(r) - 1) < 1e-5 and all(round(x * 20, 4) == round(x * 20) for x in r)  # a grid point
        _, api = call(url + "/api/routing_weights", {"preference": r})
        assert _lambda_table(browser) == [[round(x, 4) for x in v] for v in api["routing_weights"].values()]

        # evaluate now: progress, then the row is in results.json and on the page
        before = len(json.loads((run3 / "results.json").read_text()))
        browser.find_element("id", "evaluate").click()
        done = _wait(browser, "return document.getElementById('eval-status').dataset.done", timeout=60)
        assert [float(x) for x in done.split(",")] == r
        rows = json.loads((run3 / "results.json").read_text())
        assert any(x["method"] == "pwemoe" and x["preference"] == r for x in rows)
        assert len(rows) in (before, before + 1)  # a grid point may already have been measured
        assert "measured" in browser.find_element("id", "eval-status").text

        browser.find_element("id", "export").click()
        text = _wait(
            browser,
            "const t = document.getElementById('export-status').textContent; return t.startsWith('written') && t",
        )
        assert Path(text.removeprefix("written to ").strip()).joinpath("pwemoe.json").is_file()

        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert resources and all(x.startswith(url) for x in resources), resources
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
        shot = tmp_path / "explorer.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("PWEMOE_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["PWEMOE_SCREENSHOT_DIR"]) / "explorer.png")


def test_chat_panel_streams_two_preferences_side_by_side(llm_run, browser):
    """A causal-LM run's page has the chat panel: generating at the slider's preference and at another one
    streams both answers, each equal to the API's answer for the same request."""
    from pwemoe import PreferenceModel
    from pwemoe.serve.app import create_app

    model = PreferenceModel(llm_run, max_batch=4, max_test_samples=2)
    try:
        with running(create_app(model)) as url:
            browser.get(url + "/")
            _wait(browser, "return document.body.dataset.lambdaFor")
            assert browser.find_element("id", "chat").is_displayed()
            browser.find_element("id", "chat-prompt").send_keys("good red film ?")
            browser.execute_script("document.getElementById('chat-max').value = '8'")
            other = browser.find_element("id", "chat-other")
            other.clear()
            other.send_keys("0,0,1")
            browser.find_element("id", "chat-go").click()
            _wait(browser, "return document.getElementById('chat-a').dataset.finish")
            _wait(browser, "return document.getElementById('chat-b').dataset.finish")
            messages = [{"role": "user", "content": "good red film ?"}]
            for box, r in (("chat-a", [1 / 3] * 3), ("chat-b", [0, 0, 1])):
                _, res = call(
                    url + "/v1/chat/completions",
                    {"model": "run", "messages": messages, "max_tokens": 8, "temperature": 0, "preference": r},
                )
                assert browser.find_element("id", box).text == res["choices"][0]["message"]["content"].strip()
            severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not severe, severe
    finally:
        model.scheduler().close()


def test_constraints_panel_finds_a_certified_preference_and_moves_the_sliders(text_setup, tmp_path, browser):
    from pwemoe import PreferenceModel
    from pwemoe.serve.app import create_app
    from tests.fixtures import train_validation_run

    run = train_validation_run(text_setup[1], tmp_path)
    model = PreferenceModel(run, cache_size=1)
    with running(create_app(model)) as url:
        browser.get(url + "/")
        _wait(browser, "return document.body.dataset.lambdaFor")
        assert browser.find_element("id", "sel-objective").get_attribute("value") == "maximize:polarity"
        browser.execute_script(
            "const s = document.getElementById('sel-objective'); s.value = 'maximize:color';"
            "document.getElementById('sel-min-0').value = '0.9';"  # polarity >= 0.9 x expert
            "document.getElementById('sel-budget').value = '6';"
            "document.getElementById('sel-confidence').value = '0.95';"
        )
        browser.find_element("id", "select").click()
        status = _wait(browser, "return document.getElementById('select-status').dataset.status", timeout=120)
        rec = json.loads(next((run / "selections").glob("*.json")).read_text())
        assert status == rec["status"] == "certified"
        assert rec["query"]["require"] == ["polarity >= 0.9 expert"] and rec["query"]["objective"] == "maximize color"
        chosen = rec["chosen"]["preference"]
        shown = browser.execute_script("return document.getElementById('select-status').dataset.preference")
        assert [float(x) for x in shown.split(",")] == chosen
        # the sliders moved to the answer: lambda(r) is shown for the chosen r
        _wait(
            browser,
            f"const v = document.body.dataset.lambdaFor.split(',').map(Number), w = {chosen};"
            "return v.length === w.length && v.every((x, i) => x === w[i])",
        )
        assert [float(browser.find_element("id", f"rn-{i}").get_attribute("value")) for i in range(2)] == [
            round(x, 2) for x in chosen
        ]
        assert "certified at 95%" in browser.find_element("id", "select-status").text
        assert "polarity >= 0.9 expert" in browser.find_element("id", "select-result").text
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
