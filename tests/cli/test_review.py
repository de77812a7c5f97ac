"""`python -m distft.review` as the user runs it: the review page clicked through in a real headless
browser (chromium through selenium; issue 19, item 5), the command's one-line refusals (planted
links and pipes, damaged lines), a second OS user without the token (issue 34), and a torn
ratings line skipped with a warning.

The in-process tests: tests/unit/test_review.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest

from distft.errors import ReviewError
from distft.evaluation.review import (
    Review,
    exposure_warning,
    read_predictions,
    wilson,
)
from distft.preflight import preflight
from tests.unit.test_review import call, owner, post_rating, served, write_predictions

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_root(reason: str) -> None:
    """Skip a test that needs root, except under CI (which runs as root), where not being root fails it."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail(f"CI is set but this is not root: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists("/usr/bin/chromedriver"):
        require_root("needs Debian's chromium and chromium-driver (tests/install-browser.sh installs them as root)")
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


def files_holding(root: str, needle: str) -> list[str]:
    hits = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and needle.encode() in open(path, "rb").read():
                hits.append(path)
    return hits


def start_cli(directory: str, *args: str) -> tuple[subprocess.Popen, str]:
    """`python -m distft.review DIR ARGS` started, and the URL it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "distft.review", directory, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline()
    match = re.search(r"review: (http://\S+:\d+/\?token=[\w-]+) ", line)
    if not match:
        proc.kill()
        pytest.fail(f"no URL printed: {line!r} {proc.communicate(timeout=30)}")
    return proc, match.group(1)


def stop(proc: subprocess.Popen) -> str:
    """Stop a started review server; its stderr."""
    proc.terminate()
    return proc.communicate(timeout=30)[1]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.review", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_browse_filter_and_rate_blind_in_a_browser(browser, run_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    predictions = [json.loads(line) for line in open(os.path.join(run_dir, "eval_report.predictions.jsonl"))]
    before = tree_digest(run_dir, os.path.join(run_dir, "review"))
    server, url = start_cli(run_dir)
    token = url.split("?token=")[1]
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{43}", url)
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
        assert browser.find_element(By.ID, "p-note").text == ""  # every rating saved
        ratings = [json.loads(line) for line in open(os.path.join(run_dir, "review", "ratings.jsonl"))]
        assert [(r["index"], r["winner"]) for r in ratings] == expected
        assert all(r["pair"] == ["base", "tuned"] for r in ratings)

        # The bare URL, without the token: the cookie the first visit set lets the page in.
        browser.get(url.split("?")[0])
        wait.until(lambda d: d.find_element(By.ID, "count").text.startswith(f"{len(predictions)} of"))
        assert browser.find_element(By.ID, "error").text == ""
        # The Summary tab: an HTML table (not Markdown text), its cells the summary's.
        browser.find_element(By.ID, "tab-summary").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#summary-table tbody td"))
        [row] = browser.find_elements(By.CSS_SELECTOR, "#summary-table tbody tr")
        cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
        wins_b = sum(w == "tuned" for _, w in expected)
        wins_a = sum(w == "base" for _, w in expected)
        low, high = wilson(wins_b, wins_a + wins_b)
        assert cells == ["a=base, b=tuned", "3", str(wins_a), str(wins_b), "1", "0",
                         f"{wins_b / 2:.2f} ({low:.2f}-{high:.2f})"]
        assert "|" not in browser.find_element(By.ID, "summary").text
        assert browser.find_element(By.ID, "summary-note").text.startswith("Win rate: b's share")
    finally:
        stop(server)
    assert tree_digest(run_dir, os.path.join(run_dir, "review")) == before  # read-only but for its ratings
    assert files_holding(run_dir, token) == []  # the token is printed, never written down
    printed = run_cli(run_dir, "--summary").stdout
    assert "| a=base, b=tuned | 3 |" in printed


def test_a_directory_without_predictions_is_one_message(tmp_path):
    proc = run_cli(str(tmp_path))
    assert proc.returncode == 2 and "has no predictions file" in proc.stderr


# ------------------------------------------------------------------------- its owner only


def test_a_host_given_by_hand_is_allowed_and_warned_about(tmp_path):
    write_predictions(tmp_path)
    with served(Review(str(tmp_path)), host="127.0.0.2") as server:
        port = server.server_address[1]
        for host, expected in ((f"127.0.0.2:{port}", 200), (f"localhost:{port}", 200),
                               (f"rebind.attacker.example:{port}", 403)):
            assert call(server, "GET", "/api/summary", headers=owner(server, Host=host))[0] == expected, host
        assert call(server, "GET", "/api/summary", headers={"Host": f"127.0.0.2:{port}"})[0] == 403  # token still needed
    assert [exposure_warning(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1")] == [None] * 4
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        assert "anyone who can reach that address and has the printed URL" in exposure_warning(host)
    proc, url = start_cli(str(tmp_path), "--host", "0.0.0.0")
    stderr = stop(proc)
    assert url.startswith("http://0.0.0.0:") and "?token=" in url
    assert "warning: serving on 0.0.0.0" in stderr and url.split("?token=")[1] not in stderr


def test_a_second_user_without_the_token_is_refused(tmp_path):
    """Another OS user on the machine (`nobody`, through setpriv) reaches the port, not the predictions."""
    require_root("runs a client as user nobody through setpriv (root only, as CI runs)")
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    if not os.path.exists(setpriv):
        (pytest.fail if IN_CI else pytest.skip)("needs util-linux's setpriv")
    write_predictions(tmp_path)
    with served(Review(str(tmp_path))) as server:
        port = server.server_address[1]
        pair = json.loads(call(server, "GET", "/api/pair", headers=owner(server))[2])  # held by the owner's tab

        def as_nobody(request: str) -> str:
            """`request` sent as user nobody (bash's /dev/tcp: nothing of this user's needed); `id -u`, then the answer."""
            script = f'id -u; exec 3<>/dev/tcp/127.0.0.1/{port} && printf "%s" "$REQUEST" >&3 && cat <&3'
            return subprocess.run([setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", "-c", script],
                                  env={"PATH": "/usr/bin:/bin", "REQUEST": request}, cwd="/", capture_output=True,
                                  text=True, timeout=60, check=True).stdout

        host = f"Host: 127.0.0.1:{port}\r\n"
        body = json.dumps({"reservation": pair["reservation"], "choice": "left"})
        rate = (f"POST /api/rate HTTP/1.0\r\n{host}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}")
        for request in (f"GET /api/predictions HTTP/1.0\r\n{host}\r\n", f"GET / HTTP/1.0\r\n{host}\r\n", rate):
            uid, status, *rest = as_nobody(request).split("\n")
            assert uid == "65534" and status.startswith("HTTP/1.0 403"), (uid, status)
            assert "secret prompt" not in "\n".join(rest)
        assert not os.path.exists(tmp_path / "review")
        # The same user with the token gets in: what keeps it out is the token, not the network.
        answer = as_nobody(f"GET /api/predictions HTTP/1.0\r\n{host}Authorization: token {server.token}\r\n\r\n")
        assert answer.split("\n")[1].startswith("HTTP/1.0 200") and "secret prompt 1" in answer


# ------------------------------------------------------------------------- planted links and pipes


@pytest.mark.parametrize("planted", ["ratings file -> missing file", "review folder -> a folder",
                                     "review folder -> missing folder", "a pipe in place of the review folder"])
def test_a_rating_is_never_written_through_a_planted_link(tmp_path, planted):
    run = tmp_path / "run"
    write_predictions(run)
    elsewhere = tmp_path / "elsewhere"
    target = elsewhere / "ratings.jsonl"
    says = ("symbolic link", "symbolic link")  # what the rating's error and the next pair's say
    with served(Review(str(run))) as server:
        pair = json.loads(call(server, "GET", "/api/pair", headers=owner(server))[2])
        if planted == "ratings file -> missing file":
            target = tmp_path / "missing_profile"
            os.makedirs(run / "review")
            os.symlink(target, run / "review" / "ratings.jsonl")
        elif planted == "a pipe in place of the review folder":
            os.mkfifo(run / "review")
            says = ("File exists", "Not a directory")
        else:
            if planted == "review folder -> a folder":
                os.makedirs(elsewhere)
            os.symlink(elsewhere, run / "review")
        status, _, body = post_rating(server, pair["reservation"], timeout=10)
        assert status >= 400 and says[0] in json.loads(body)["error"], body
        status, _, body = call(server, "GET", "/api/pair", headers=owner(server), timeout=10)
        assert status == 400 and says[1] in json.loads(body)["error"]
    assert not os.path.lexists(target)
    assert sorted(os.listdir(tmp_path)) == sorted(["run", *(["elsewhere"] if "-> a folder" in planted else [])])
    assert not os.path.exists(elsewhere) or os.listdir(elsewhere) == []
    proc = run_cli(str(run), "--summary", timeout=30)
    assert proc.returncode == 2 and says[1] in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("planted", ["fifo", "link"])
def test_ratings_are_never_read_from_a_planted_pipe_or_link(tmp_path, planted):
    write_predictions(tmp_path)
    os.makedirs(tmp_path / "review")
    ratings = tmp_path / "review" / "ratings.jsonl"
    if planted == "fifo":
        os.mkfifo(ratings)  # nobody writes to it: reading it would wait forever
    else:
        other = tmp_path / "someone_elses.jsonl"
        other.write_text(json.dumps({"index": 1, "pair": ["base", "tuned"], "winner": "tuned"}) + "\n")
        os.symlink(other, ratings)
    kind = "named pipe (FIFO)" if planted == "fifo" else "symbolic link"
    proc = run_cli(str(tmp_path), "--summary", timeout=30)
    assert proc.returncode == 2 and kind in proc.stderr and proc.stdout == "", proc
    with served(Review(str(tmp_path))) as server:
        for path in ("/api/pair", "/api/summary"):
            status, _, body = call(server, "GET", path, headers=owner(server), timeout=10)
            assert status == 400 and kind in json.loads(body)["error"], path
        assert call(server, "GET", "/api/predictions", headers=owner(server))[0] == 200  # Browse still works


@pytest.mark.parametrize("planted", ["the run's file, a link to a fifo", "--predictions a fifo",
                                     "--predictions a link to /dev/zero"])
def test_a_predictions_file_that_is_not_a_regular_file_is_one_message(tmp_path, planted):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    run = tmp_path / "run"
    os.makedirs(run)
    if planted == "the run's file, a link to a fifo":
        os.symlink(fifo, run / "eval_report.predictions.jsonl")
        args, kind = [], "is a symbolic link"
    elif planted == "--predictions a fifo":
        args, kind = ["--predictions", str(fifo)], "is a named pipe (FIFO), not a regular file"
    else:
        os.symlink("/dev/zero", tmp_path / "zero.jsonl")
        args, kind = ["--predictions", str(tmp_path / "zero.jsonl")], "is a character device, not a regular file"
    proc = run_cli(str(run), *args, timeout=30)
    assert proc.returncode == 2 and kind in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc


@pytest.mark.parametrize("line, says", [
    ("[" * 100_000 + "]" * 100_000, "line 3 is not a prediction record"),  # too deep to parse: not a RecursionError
    ('{"index": 2, "prompt": "p", "outputs": {"base": {"text": "a", "f1": NaN}, "tuned": {"text": "b"}}}',
     "line 3 is not a prediction record"),  # the page's JSON.parse would refuse NaN
    ('{"index": 2, "prompt": "p", "outputs": {"base": {"text": 7}, "tuned": {"text": "b"}}}',
     "line 3 is not a prediction record"),
    ('{"index": 2, "prompt": "p", "outputs": {"base": {"text": "a"}, "other": {"text": "b"}}}',
     "line 3 has the answers of base, other, the first line those of base, tuned"),
    ('{"index": 1, "prompt": "p", "outputs": {"base": {"text": "a"}, "tuned": {"text": "b"}}}',
     "line 3 repeats index 1"),
], ids=["nested too deep", "NaN", "an answer not text", "other models", "an index twice"])
def test_a_damaged_predictions_line_is_one_message(tmp_path, line, says):
    path = write_predictions(tmp_path, n=2)
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(ReviewError, match=re.escape(f"{path}: {says}")):
        read_predictions(path)
    proc = run_cli(str(tmp_path))
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------- each prompt rated once


def test_a_torn_ratings_line_is_skipped_with_a_warning(tmp_path):
    write_predictions(tmp_path)
    os.makedirs(tmp_path / "review")
    good = [{"index": i, "pair": ["base", "tuned"], "left": "base", "right": "tuned", "choice": "left",
             "winner": "base", "time": 0} for i in (1, 2)]
    (tmp_path / "review" / "ratings.jsonl").write_text(
        f"{json.dumps(good[0])}\ngarbage in the middle\n{json.dumps(good[1])}\n" + '{"index": 3, "pa')
    path = str(tmp_path / "review" / "ratings.jsonl")
    proc = run_cli(str(tmp_path), "--summary")
    high = wilson(0, 2)[1]
    assert proc.returncode == 0 and f"| a=base, b=tuned | 2 | 2 | 0 | 0 | 0 | 0.00 (0.00-{high:.2f}) |" in proc.stdout
    assert f"{path}: line 2 is not a JSON record" in proc.stderr and f"{path}: line 4 is torn" in proc.stderr

    server, url = start_cli(str(tmp_path))
    try:
        port, token = re.search(r":(\d+)/\?token=(.+)", url).groups()
        conn = types.SimpleNamespace(server_address=("127.0.0.1", int(port)), token=token)
        assert call(conn, "GET", "/", headers=owner(conn))[0] == 200
        for _ in range(3):
            summary = json.loads(call(conn, "GET", "/api/summary", headers=owner(conn))[2])
            assert [(r["a"], r["b"], r["n"], r["wins_a"]) for r in summary["pairs"]] == [("base", "tuned", 2, 2)]
            pair = json.loads(call(conn, "GET", "/api/pair", headers=owner(conn))[2])
            assert pair["prompt"] in ("secret prompt 3", "secret prompt 4", "secret prompt 5")
    finally:
        stderr = stop(server)
    assert stderr.count(f"{path}: line 4 is torn") == 1  # warned once, not at every request
    assert stderr.count(f"{path}: line 2 is not a JSON record") == 1



def test_a_multi_line_reference_keeps_its_lines_and_the_page_says_it_is_loading(browser, tmp_path):
    """The reference is shown as written (a list, code: its lines kept), in Browse and in Blind; and
    the page says it is loading until the predictions arrive, then says nothing of it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    reference = "1. Preheat the oven.\n2. Bake for 20 minutes."
    with open(tmp_path / "eval_report.predictions.jsonl", "w") as f:
        for i in range(2):
            f.write(json.dumps({"index": i, "task": "t", "prompt": f"How do I bake? ({i})", "reference": reference,
                                "outputs": {"base": {"text": f"No idea {i}.", "exact_match": 0},
                                            "tuned": {"text": f"Preheat, then bake {i}.", "exact_match": 0}}}) + "\n")
    server, url = start_cli(str(tmp_path))
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "count").text.startswith("2 of"))
        assert not browser.find_element(By.ID, "loading").is_displayed()
        cells = browser.find_elements(By.CSS_SELECTOR, "#rows tbody tr:first-child td")
        assert cells[2].text == reference  # collapsed to one line before: "1. Preheat the oven. 2. Bake ..."
        browser.find_element(By.ID, "tab-blind").click()
        wait.until(lambda d: d.find_element(By.ID, "p-prompt").text.strip() != "")
        assert browser.find_element(By.ID, "p-ref").text == reference
    finally:
        stop(server)
    from distft.evaluation.review import PAGE

    # Served as it arrives, before its script has fetched anything: the loading line shown.
    assert '<p class="meta" id="loading">Loading the predictions...</p>' in PAGE
