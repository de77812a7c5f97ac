"""`python -m distft.review`: the review page, clicked through in a real headless browser (Debian's
chromium through selenium; issue 19, item 5), on a real run's predictions."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from distft.preflight import preflight
from distft.review import summarise, wilson

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists("/usr/bin/chromedriver"):
        if os.geteuid() != 0:
            reason = "needs Debian's chromium and chromium-driver (tests/install-browser.sh installs them as root)"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(f"CI is set but this is not root: {reason}", pytrace=False)
            pytest.skip(reason)
        subprocess.run(["bash", os.path.join(REPO, "tests", "install-browser.sh")], check=True, timeout=600)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from distft.train import train

    cfg, errors = preflight(["+experiment=tiny_lora", f"run.root={tmp_path_factory.mktemp('runs')}",
                             "train.max_steps=6", "train.lr=3e-3", "eval.num_samples=8", "eval.max_new_tokens=6",
                             "tracking.progress_bar=false"])
    assert errors == []
    return train(cfg)["run_dir"]


def tree_digest(root: str, skip: str) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not path.startswith(skip):
                out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_wilson_interval_and_summary_counts():
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook Wilson score interval
    assert wilson(0, 0) == (0.0, 1.0)
    ratings = [{"index": 0, "pair": ["base", "t"], "winner": "base"}, {"index": 0, "pair": ["base", "t"], "winner": "t"},
               {"index": 1, "pair": ["base", "t"], "winner": "tie"}, {"index": 2, "pair": ["base", "t"], "winner": "t"},
               {"index": 3, "pair": ["base", "t"], "winner": "both_bad"}]
    [row] = summarise(ratings)  # prompt 0 rated twice: the last rating counts
    assert (row["n"], row["wins_a"], row["wins_b"], row["ties"], row["both_bad"]) == (4, 0, 2, 1, 1)
    assert row["win_rate_b"] == 1.0 and row["ci_b"] == list(wilson(2, 2))


def test_browse_filter_and_rate_blind_in_a_browser(browser, run_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    predictions = [json.loads(line) for line in open(os.path.join(run_dir, "eval_report.predictions.jsonl"))]
    before = tree_digest(run_dir, os.path.join(run_dir, "review"))
    server = subprocess.Popen([sys.executable, "-m", "distft.review", run_dir], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        url = re.search(r"review: (http://127\.0\.0\.1:\d+/)", server.stdout.readline()).group(1)
        wait = WebDriverWait(browser, 20)
        browser.get(url)
        wait.until(lambda d: d.find_element(By.ID, "count").text.startswith(f"{len(predictions)} of"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr")
        assert [int(r.get_attribute("data-index")) for r in rows] == [p["index"] for p in predictions]
        # Filters: a task; the tuned model's wrong answers; disagreements.
        task = predictions[0]["task"]
        Select(browser.find_element(By.ID, "f-task")).select_by_value(task)
        assert browser.find_element(By.ID, "count").text == (
            f"{sum(p['task'] == task for p in predictions)} of {len(predictions)} prompts")
        Select(browser.find_element(By.ID, "f-task")).select_by_value("")
        Select(browser.find_element(By.ID, "f-model")).select_by_value("tuned")
        Select(browser.find_element(By.ID, "f-em")).select_by_value("0")
        wrong = sum(p["outputs"]["tuned"]["exact_match"] == 0 for p in predictions)
        assert browser.find_element(By.ID, "count").text == f"{wrong} of {len(predictions)} prompts"
        Select(browser.find_element(By.ID, "f-em")).select_by_value("")
        browser.find_element(By.ID, "f-disagree").click()
        differ = sum(p["outputs"]["base"]["text"].strip() != p["outputs"]["tuned"]["text"].strip()
                     or p["outputs"]["base"]["exact_match"] != p["outputs"]["tuned"]["exact_match"] for p in predictions)
        assert browser.find_element(By.ID, "count").text == f"{differ} of {len(predictions)} prompts"

        # Blind: three ratings, each side read off the page and matched to its model by its text.
        browser.find_element(By.ID, "tab-blind").click()
        asked = [p for p in predictions if p["outputs"]["base"]["text"].strip() != p["outputs"]["tuned"]["text"].strip()]
        assert len(asked) >= 3, "the tiny run's tuned answers should differ from its base's"
        expected = []
        for choice in ("left", "right", "tie"):
            wait.until(lambda d: d.find_element(By.ID, "p-prompt").text.strip() != "" and
                       not d.find_element(By.ID, "pair").get_attribute("hidden"))
            prompt = browser.find_element(By.ID, "p-prompt").text
            record = next(p for p in asked if p["prompt"].strip() == prompt.strip())
            left_text = browser.find_element(By.ID, "left").text.strip()
            left = next(label for label, o in record["outputs"].items() if o["text"].strip() == left_text)
            right = "tuned" if left == "base" else "base"
            expected.append((record["index"], {"left": left, "right": right, "tie": "tie"}[choice]))
            browser.find_element(By.ID, f"btn-{choice}").click()
            wait.until(lambda d, p=prompt: d.find_element(By.ID, "p-prompt").text != p
                       or d.find_element(By.ID, "pair").get_attribute("hidden"))
        ratings = [json.loads(line) for line in open(os.path.join(run_dir, "review", "ratings.jsonl"))]
        assert [(r["index"], r["winner"]) for r in ratings] == expected
        assert all(r["pair"] == ["base", "tuned"] for r in ratings)

        browser.find_element(By.ID, "tab-summary").click()
        wait.until(lambda d: "| a=base, b=tuned |" in d.find_element(By.ID, "summary-text").text)
        text = browser.find_element(By.ID, "summary-text").text
        wins_b = sum(w == "tuned" for _, w in expected)
        wins_a = sum(w == "base" for _, w in expected)
        low, high = wilson(wins_b, wins_a + wins_b)
        assert f"| a=base, b=tuned | 3 | {wins_a} | {wins_b} | 1 | 0 | {wins_b / 2:.2f} ({low:.2f}-{high:.2f}) |" in text
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert tree_digest(run_dir, os.path.join(run_dir, "review")) == before  # read-only but for its ratings
    printed = subprocess.run([sys.executable, "-m", "distft.review", run_dir, "--summary"], capture_output=True,
                             text=True, cwd=REPO).stdout
    assert "| a=base, b=tuned | 3 |" in printed


def test_a_directory_without_predictions_is_one_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distft.review", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 2 and "has no predictions file" in proc.stderr
