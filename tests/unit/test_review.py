"""`python -m distft.review`: the review page, clicked through in a real headless browser (Debian's
chromium through selenium; issue 19, item 5), on a real run's predictions; and what issue 34 asks
of it: answering its owner only (a token, the Host, the Origin, JSON bodies; a second OS user),
never writing or reading through planted links and pipes, each prompt rated once however many tabs
rate at the same time, and a torn ratings line skipped with a warning.

The tests that start a process: tests/cli/test_review.py."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import threading
import time
import types

import pytest

from distft.errors import ReviewError
from distft.evaluation.review import (
    SCRIPT,
    Review,
    make_server,
    summarise,
    wilson,
)


def write_predictions(directory, n: int = 6, identical: tuple = (0,)) -> str:
    """A run directory's predictions file: n prompts, base and tuned answering alike at `identical`."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "eval_report.predictions.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            tuned = f"base answer {i}" if i in identical else f"tuned answer {i}"
            f.write(json.dumps({"index": i, "task": "t", "prompt": f"secret prompt {i}", "reference": f"ref {i}",
                                "outputs": {"base": {"text": f"base answer {i}", "exact_match": 0, "f1": 0.5},
                                            "tuned": {"text": tuned, "exact_match": 1, "f1": 1.0}}}) + "\n")
    return path


@contextlib.contextmanager
def served(review: Review, host: str = "127.0.0.1"):
    """The page's real server for `review`, in a thread of this process."""
    server = make_server(review, host)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def call(server, method: str, path: str, body=None, headers=None, timeout: float = 30):
    """One HTTP request to `server`: (status, response headers, body as text)."""
    address, port = server.server_address[:2]
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read().decode()
    finally:
        conn.close()


def owner(server, **extra) -> dict:
    return {"Authorization": f"token {server.token}", **extra}


def post_rating(server, reservation: str, choice: str = "left", headers=None, timeout: float = 30):
    return call(server, "POST", "/api/rate", json.dumps({"reservation": reservation, "choice": choice}),
                headers if headers is not None else owner(server, **{"Content-Type": "application/json"}), timeout)


def test_wilson_interval_and_summary_counts():
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook Wilson score interval
    assert wilson(0, 0) == (0.0, 1.0)
    ratings = [{"index": 0, "pair": ["base", "t"], "winner": "base"}, {"index": 0, "pair": ["base", "t"], "winner": "t"},
               {"index": 1, "pair": ["base", "t"], "winner": "tie"}, {"index": 2, "pair": ["base", "t"], "winner": "t"},
               {"index": 3, "pair": ["base", "t"], "winner": "both_bad"}]
    [row] = summarise(ratings)  # prompt 0 rated twice (a file from before the page refused that): the first counts
    assert (row["n"], row["wins_a"], row["wins_b"], row["ties"], row["both_bad"]) == (4, 1, 1, 1, 1)
    assert row["win_rate_b"] == 0.5 and row["ci_b"] == list(wilson(1, 2))
    low, high = wilson(1, 2)
    assert row["win_rate_text"] == f"0.50 ({low:.2f}-{high:.2f})"


# ------------------------------------------------------------------------- its owner only


def test_the_page_answers_its_owner_only(tmp_path):
    """The token (URL, then cookie; or header), the Host, the Origin and a JSON body, over real HTTP."""
    write_predictions(tmp_path)
    with served(Review(str(tmp_path))) as server:
        port = server.server_address[1]
        for path in ("/", "/api/predictions", "/api/pair", "/api/summary"):  # no token
            status, _, body = call(server, "GET", path)
            assert status == 403 and "secret prompt" not in body and "answer" not in body
        wrong = "x" + server.token[1:]
        for headers, path in (({}, f"/api/predictions?token={wrong}"), ({"Authorization": f"token {wrong}"}, "/"),
                              ({"Cookie": f"distft-review-{port}={wrong}"}, "/api/predictions"),
                              ({"Cookie": f"distft-review-{port + 1}={server.token}"}, "/api/predictions")):
            status, _, body = call(server, "GET", path, headers=headers)
            assert status == 403 and "secret prompt" not in body, headers
        for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", f"127.0.0.1.attacker.example:{port}"):
            status, _, body = call(server, "GET", f"/api/predictions?token={server.token}", headers={"Host": host})
            assert status == 403 and "secret prompt" not in body, host

        # The token in the URL: the page, and the cookie the page's own requests then carry.
        status, page_headers, page = call(server, "GET", f"/?token={server.token}")
        assert status == 200 and "<title>distft review</title>" in page
        cookie = page_headers["Set-Cookie"]
        assert cookie.startswith(f"distft-review-{port}={server.token};")
        assert {part.strip() for part in cookie.split(";")[1:]} == {"HttpOnly", "SameSite=Strict", "Path=/"}
        jar = {"Cookie": f"other=1; {cookie.split(';')[0]}"}
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"[::1]:{port}"):
            status, headers, body = call(server, "GET", "/api/predictions", headers={**jar, "Host": host})
            assert status == 200 and "secret prompt 1" in body and "Set-Cookie" not in headers, host
        pair = json.loads(call(server, "GET", "/api/pair", headers=jar)[2])

        # A POST: the page's own Origin, a JSON body; what a cross-site form would send is refused.
        json_type = {"Content-Type": "application/json"}
        assert post_rating(server, pair["reservation"], headers={**jar, **json_type,
                                                                   "Origin": "http://evil.example"})[0] == 403
        assert post_rating(server, pair["reservation"], headers={**jar, **json_type, "Origin": "null"})[0] == 403
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            assert post_rating(server, pair["reservation"], headers={**jar, "Content-Type": kind})[0] == 415
        assert post_rating(server, pair["reservation"], headers=json_type)[0] == 403  # no token
        assert not os.path.exists(tmp_path / "review")  # nothing refused was written
        status, _, body = post_rating(server, pair["reservation"],
                                      headers={**jar, **json_type, "Origin": f"http://127.0.0.1:{port}"})
        assert status == 200 and f"secret prompt {json.loads(body)['index']}" == pair["prompt"]
        assert len(open(tmp_path / "review" / "ratings.jsonl").readlines()) == 1

        # The page runs its own script only: the policy names its hash, and nothing inline besides.
        csp = page_headers["Content-Security-Policy"]
        policy = dict(part.strip().split(" ", 1) for part in csp.split(";"))
        digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
        assert policy["script-src"] == f"'sha256-{digest}'" and f"<script>{SCRIPT}</script>" in page
        assert policy["frame-ancestors"] == "'none'" and "unsafe" not in csp


# ------------------------------------------------------------------------- planted links and pipes


def test_a_predictions_file_named_by_hand_may_be_a_link(tmp_path):
    real = write_predictions(tmp_path / "real")
    os.symlink(real, tmp_path / "mine.jsonl")
    review = Review(str(tmp_path / "run"), predictions=str(tmp_path / "mine.jsonl"))
    assert [r["index"] for r in review.records] == list(range(6))


# ------------------------------------------------------------------------- each prompt rated once


def test_concurrent_tabs_each_rate_a_distinct_prompt(tmp_path):
    """8 clients x 20 ratings at the same time over HTTP, on 100 prompts (90 asked): each prompt
    handed out and rated once, every rating saved, none overwritten."""
    write_predictions(tmp_path, n=100, identical=tuple(range(0, 100, 10)))
    asked = [i for i in range(100) if i % 10]
    rated, failures = [], []
    lock = threading.Lock()
    with served(Review(str(tmp_path))) as server:
        headers = owner(server, **{"Content-Type": "application/json"})

        def client(number: int) -> None:
            done, deadline = 0, time.monotonic() + 120
            while done < 20 and time.monotonic() < deadline:
                status, _, body = call(server, "GET", "/api/pair", headers=headers)
                pair = json.loads(body)
                if status != 200 or pair["done"]:
                    break
                if pair["waiting"]:  # the prompts left are held by other tabs
                    time.sleep(0.01)
                    continue
                choice = ("left", "right", "tie", "both_bad")[done % 4]
                status, _, body = post_rating(server, pair["reservation"], choice)
                with lock:
                    (rated if status == 200 else failures).append(json.loads(body))
                done += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        final = json.loads(call(server, "GET", "/api/pair", headers=headers)[2])
    lines = [json.loads(line) for line in open(tmp_path / "review" / "ratings.jsonl")]
    keys = [(tuple(r["pair"]), r["index"]) for r in lines]
    assert failures == []
    assert len(lines) == len(rated) == len(asked) == len(set(keys))  # one line per rating, none for a prompt twice
    assert sorted(r["index"] for r in lines) == asked and {k[0] for k in keys} == {("base", "tuned")}
    assert sorted(r["index"] for r in rated) == asked
    assert final["done"] and final["rated"] == len(asked) and final["remaining"] == 0


def test_a_prompt_already_rated_is_refused_not_overwritten(tmp_path):
    """Two reviewers, each running the page on the same directory, are handed the same prompt: the
    first rating stands, the second is refused."""
    write_predictions(tmp_path)
    first, second = Review(str(tmp_path), seed=0), Review(str(tmp_path), seed=1)
    mine, theirs = first.next_pair("base", "tuned"), second.next_pair("base", "tuned")
    assert mine["prompt"] == theirs["prompt"]
    kept = first.rate(mine["reservation"], "tie")
    with pytest.raises(ReviewError, match=rf"prompt {kept['index']} is already rated .* its first rating stands"):
        second.rate(theirs["reservation"], "left")
    [line] = open(tmp_path / "review" / "ratings.jsonl").readlines()
    assert json.loads(line) == kept
    assert second.next_pair("base", "tuned")["prompt"] != mine["prompt"]  # the other reviewer moves on
    assert [(r["n"], r["ties"]) for r in second.summary()["pairs"]] == [(1, 1)]


def test_a_rating_waits_for_another_server_holding_the_review_folder(tmp_path, monkeypatch):
    """Another server on the same directory checks and appends under an flock of the review folder:
    a rating waits for it, and after LOCK_WAIT_SECONDS says so instead of racing it."""
    import fcntl

    write_predictions(tmp_path)
    os.makedirs(tmp_path / "review")
    review = Review(str(tmp_path))
    first, second = review.next_pair("base", "tuned"), review.next_pair("base", "tuned")
    folder = os.open(tmp_path / "review", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # what the other server holds while it checks and appends
        monkeypatch.setattr("distft.evaluation.review.LOCK_WAIT_SECONDS", 0.3)
        with pytest.raises(ReviewError, match="locked by another process"):
            review.rate(first["reservation"], "left")
        monkeypatch.setattr("distft.evaluation.review.LOCK_WAIT_SECONDS", 60)
        rating = threading.Thread(target=review.rate, args=(second["reservation"], "left"))
        rating.start()
        rating.join(timeout=0.5)
        assert rating.is_alive() and not os.path.exists(tmp_path / "review" / "ratings.jsonl")
    finally:
        os.close(folder)  # the other server is done: the rating goes in
    rating.join(timeout=30)
    assert [json.loads(line)["pair"] for line in open(tmp_path / "review" / "ratings.jsonl")] == [["base", "tuned"]]


def test_a_reserved_prompt_waits_for_its_tab_until_it_expires(tmp_path, monkeypatch):
    write_predictions(tmp_path, n=3, identical=(0,))  # prompts 1 and 2 asked
    clock = [1000.0]
    monkeypatch.setattr("distft.evaluation.review.time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time,
                                                                   sleep=time.sleep))
    review = Review(str(tmp_path))
    one, two = review.next_pair("base", "tuned"), review.next_pair("base", "tuned")
    assert {one["prompt"], two["prompt"]} == {"secret prompt 1", "secret prompt 2"}
    third = review.next_pair("base", "tuned")
    assert third["waiting"] and not third["done"] and third["remaining"] == 2 and "reservation" not in third
    assert "being rated in another tab" in third["message"] and "10 minutes" in third["message"]
    clock[0] += 300
    again = review.next_pair("base", "tuned", release=one["reservation"])  # tab one moves on: gives its prompt back
    assert again["prompt"] == one["prompt"]
    with pytest.raises(ReviewError, match="unknown or expired"):
        review.rate(one["reservation"], "left")
    clock[0] += 301  # tab two went to lunch: its prompt is handed out again, tab one's (newer) is not
    late = review.next_pair("base", "tuned")
    assert late["prompt"] == two["prompt"]
    review.rate(late["reservation"], "right")
    with pytest.raises(ReviewError, match="unknown or expired"):
        review.rate(two["reservation"], "left")
    review.rate(again["reservation"], "tie")
    assert review.next_pair("base", "tuned")["done"]
