"""Read every prediction side by side, and rate them blind: `distft review` / `python -m distft.review
RUN_OR_COMPARE_DIR` (the command line: distft/commands/review.py).

A local web page for the manual review of model outputs, on the standard library's HTTP server
(no framework, no build step, nothing fetched: it works offline); it prints its address and
serves until Ctrl-C:
- **Browse**: every prompt of the predictions file (`eval_report.predictions.jsonl` of a run,
  `compare_report.predictions.jsonl` of `distft.evaluation.compare`, or `--predictions FILE`), reference and
  each model's answer with its scores, filtered by task, by one model's exact match, and to the
  prompts where the models disagree (different answers, or one right where another is wrong);
- **Blind**: two models' answers to one prompt, in random order, unlabelled; the reviewer picks the
  better one, a tie, or both bad. Prompts with identical answers are not asked. A prompt is handed
  to one tab at a time (reserved until rated, or for 10 minutes), and one already rated is refused,
  not overwritten: the first rating stands (and is the one counted, should a file hold two);
- **Summary** (also `--summary`, printed without serving): per pair of models, the win rate among
  the decided ratings with a 95% Wilson interval, and the ties and both-bad counts.

For its owner only, as Jupyter's and TensorBoard's pages are (other users of the machine, and the
web pages the browser opens, are not trusted): bound to 127.0.0.1 unless `--host`; every request
needs the random token of the printed URL (`?token=`, then the HttpOnly SameSite=Strict cookie the
first visit sets, or `Authorization: token ...`; never written to a file nor logged) and a `Host`
of 127.0.0.1, localhost, [::1] or `--host` (against DNS rebinding); a POST needs a same-origin `Origin`
(when sent) and a JSON body, which a cross-site form cannot send. The page runs its own script only
(a Content-Security-Policy hash) and writes every text with textContent. The run directory is not
trusted either (the README's threat model): the predictions file is read only if it is a regular
file, ratings (`<dir>/review/ratings.jsonl`, JSON lines) are appended by `distft.files.append_line`
(no link followed, regular files only, under a lock) and read by `read_json_lines`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import hmac
import http.server
import ipaddress
import json
import logging
import math
import os
import random
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

from distft.errors import OutputError, ReviewError
from distft.files import NotAFile, append_line, describe, directory_fd, open_regular, read_json_lines, writing

log = logging.getLogger("distft")

PREDICTION_FILES = ("eval_report.predictions.jsonl", "compare_report.predictions.jsonl")
RATINGS = os.path.join("review", "ratings.jsonl")
CHOICES = ("left", "right", "tie", "both_bad")
RESERVE_SECONDS = 600.0  # a pair handed to a tab is kept from the others this long, unless rated
LOCK_WAIT_SECONDS = 10.0  # how long a rating waits for another server appending to the same file
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MAX_BODY = 1 << 16


# ------------------------------------------------------------------------------ the files


def find_predictions(directory: str) -> str:
    """The directory's predictions file. A name that exists as anything (a planted link or pipe
    included) is the one: `read_predictions` then refuses it by name rather than skipping it."""
    for name in PREDICTION_FILES:
        path = os.path.join(directory, name)
        if os.path.lexists(path):
            return path
    raise ReviewError(f"{directory} has no predictions file ({' or '.join(PREDICTION_FILES)}): give a finished run "
                      "directory, a `python -m distft.compare` directory, or --predictions FILE")


def _unreadable(what: str, path: str, err: OSError) -> ReviewError:
    reason = str(err) if isinstance(err, NotAFile) else describe(err, skip_path=path)
    return ReviewError(f"cannot read {what} {path}: {reason}")


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: the page's JSON.parse would refuse them


def _prediction_record(line: str) -> dict:
    """One line of the predictions file, if it has the shape the page reads (ValueError or
    TypeError otherwise): an int index, a text prompt, and per model a dict with a text answer."""
    record = json.loads(line, parse_constant=_no_constants)
    outputs = record["outputs"]
    if not (isinstance(record["index"], int) and isinstance(record["prompt"], str) and isinstance(outputs, dict)
            and outputs and all(isinstance(o, dict) and isinstance(o.get("text"), str) for o in outputs.values())):
        raise ValueError("not a prediction record")
    return record


def read_predictions(path: str, follow_links: bool = False) -> list[dict]:
    """The records of a predictions file: a regular file only (`open_regular`: a FIFO or a device
    is refused, not waited on or read forever; unless `follow_links`, so is a link as its name),
    each line a record over the same models, each index once; otherwise one ReviewError naming
    the line."""
    records: list[dict] = []
    indexes: set[int] = set()
    try:
        with open_regular(path, "r", follow_links=follow_links) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = _checked_record(path, number, line, records[0] if records else None, indexes)
                    records.append(record)
                    indexes.add(record["index"])
    except OSError as err:
        raise _unreadable("the predictions file", path, err) from None
    except UnicodeDecodeError:
        raise ReviewError(f"{path} is not UTF-8 text") from None
    if not records:
        raise ReviewError(f"{path} holds no predictions")
    return records


def _checked_record(path: str, number: int, line: str, first: Optional[dict], indexes: set[int]) -> dict:
    try:
        record = _prediction_record(line)
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deep to parse
        raise ReviewError(f"{path}: line {number} is not a prediction record") from None
    if first is not None and list(record["outputs"]) != list(first["outputs"]):
        raise ReviewError(f"{path}: line {number} has the answers of {', '.join(record['outputs'])}, the first line "
                          f"those of {', '.join(first['outputs'])}")
    if record["index"] in indexes:
        raise ReviewError(f"{path}: line {number} repeats index {record['index']}")
    return record


def wilson(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion wins/n (95% for z=1.96); (0, 1) for n=0."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def read_ratings(path: str) -> list[dict]:
    """The ratings in `path` (none while it does not exist), read by `read_json_lines`: a regular
    file only, its own name and its folder's not links; a torn or damaged line is skipped with a
    warning naming it, and so (in one warning) is a line that is not a rating of this page."""
    folder = os.path.dirname(path)
    if os.path.islink(folder):
        raise ReviewError(f"cannot read the ratings {path}: {folder} is a symbolic link; distft never reads or writes "
                          "a review folder through a link (it may have been planted there): remove it and rerun")
    try:
        lines = read_json_lines(path)
    except OSError as err:
        raise _unreadable("the ratings", path, err) from None
    ratings = [line for line in lines if _is_rating(line)]
    if len(ratings) < len(lines):
        log.warning("%s: %d line(s) are not ratings of the review page (index, pair, winner); skipped", path,
                    len(lines) - len(ratings))
    return ratings


def _is_rating(rating: dict) -> bool:
    pair = rating.get("pair")
    return (isinstance(rating.get("index"), int) and isinstance(pair, list) and len(pair) == 2
            and all(isinstance(label, str) for label in pair) and rating.get("winner") in (*pair, "tie", "both_bad"))


def summarise(ratings: list[dict]) -> list[dict]:
    """Per pair of models (in the order first rated): n, wins of each, ties, both bad, the second
    model's win rate among the decided ratings and its 95% Wilson interval. The first rating of
    each (pair, prompt) counts: the page refuses a second one (a file may hold two from before)."""
    first: dict[tuple, dict] = {}
    for rating in ratings:
        first.setdefault((tuple(rating["pair"]), rating["index"]), rating)
    pairs: dict[tuple, dict] = {}
    for (pair, _), rating in first.items():
        entry = pairs.setdefault(pair, {"a": pair[0], "b": pair[1], "n": 0, "wins_a": 0, "wins_b": 0, "ties": 0,
                                        "both_bad": 0})
        entry["n"] += 1
        key = {pair[0]: "wins_a", pair[1]: "wins_b", "tie": "ties", "both_bad": "both_bad"}[rating["winner"]]
        entry[key] += 1
    for entry in pairs.values():
        decided = entry["wins_a"] + entry["wins_b"]
        entry["win_rate_b"] = entry["wins_b"] / decided if decided else None
        entry["ci_b"] = list(wilson(entry["wins_b"], decided))
        entry["win_rate_text"] = win_rate_text(entry)
    return list(pairs.values())


def win_rate_text(row: dict) -> str:
    """b's win rate and its interval as the summary shows them, "0.67 (0.21-0.94)", or "n/a"."""
    if row["win_rate_b"] is None:
        return "n/a"
    return f"{row['win_rate_b']:.2f} ({row['ci_b'][0]:.2f}-{row['ci_b'][1]:.2f})"


WIN_RATE_NOTE = ("Win rate: b's share of the ratings that picked a side (ties and both-bad left out), with its Wilson "
                 "score interval.")


def summary_text(ratings: list[dict]) -> str:
    """The summary as a Markdown table, for the terminal (`--summary`)."""
    rows = summarise(ratings)
    if not rows:
        return "No ratings yet."
    lines = ["| pair | ratings | a wins | b wins | ties | both bad | b's win rate (95% CI) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| a={r['a']}, b={r['b']} | {r['n']} | {r['wins_a']} | {r['wins_b']} | {r['ties']} | "
                     f"{r['both_bad']} | {r['win_rate_text']} |")
    return "\n".join([*lines, "", WIN_RATE_NOTE])


# ------------------------------------------------------------------------------ the state


@dataclasses.dataclass(frozen=True)
class Reservation:
    """A prompt handed to one tab for the pair (a, b), its answers in the order shown, until
    `expires` (time.monotonic)."""

    index: int
    pair: tuple[str, str]
    left: str
    right: str
    expires: float


def _answer(record: dict, label: str) -> str:
    return record["outputs"][label]["text"].strip()


class Review:
    """The state behind the page: the predictions, the ratings file, the prompts handed out."""

    def __init__(self, directory: str, predictions: Optional[str] = None, seed: Optional[int] = None,
                 reserve_seconds: float = RESERVE_SECONDS):
        self.directory = directory
        self.predictions_path = predictions or find_predictions(directory)
        # The directory's own file may have been planted as a link; a file the user named is theirs.
        self.records = read_predictions(self.predictions_path, follow_links=predictions is not None)
        self.labels = list(self.records[0]["outputs"])
        self.ratings_path = os.path.join(directory, RATINGS)
        self.random = random.Random(seed)
        self.reserve_seconds = reserve_seconds
        self.reserved: dict[str, Reservation] = {}
        self.lock = threading.Lock()  # this server's threads; another server on the directory: _folder_locked
        self._ratings_key: Optional[tuple] = None
        self._ratings_read: list[dict] = []

    def default_pair(self) -> tuple[str, str]:
        if "base" in self.labels and len(self.labels) > 1:
            return "base", [label for label in self.labels if label != "base"][-1]
        return self.labels[0], self.labels[-1]

    def next_pair(self, a: str, b: str, release: str = "") -> dict:
        """An unrated prompt where a's and b's answers differ and that no other tab holds, reserved
        for the asker, the two answers in random order; `release`: the asker's previous
        reservation, given back (a tab that moves on does not keep a prompt from the others)."""
        if a not in self.labels or b not in self.labels or a == b:
            raise ReviewError(f"pick two different models of {', '.join(self.labels)}")
        differ = [r for r in self.records if _answer(r, a) != _answer(r, b)]
        with self.lock:
            self.reserved.pop(release, None)
            now = time.monotonic()
            self.reserved = {key: held for key, held in self.reserved.items() if held.expires > now}
            rated = self._rated((a, b))
            todo = [r for r in differ if r["index"] not in rated]
            held = {h.index for h in self.reserved.values() if h.pair == (a, b)}
            free = [r for r in todo if r["index"] not in held]
            counts = {"rated": len(rated), "remaining": len(todo), "identical": len(self.records) - len(differ)}
            if not free:
                message = _waiting_message(len(todo), self.reserve_seconds)
                return {"done": not todo, "waiting": bool(todo), **counts, "message": message}
            record = free[0]
            left, right = (a, b) if self.random.random() < 0.5 else (b, a)
            key = secrets.token_urlsafe(12)
            self.reserved[key] = Reservation(record["index"], (a, b), left, right, now + self.reserve_seconds)
        return {"done": False, "waiting": False, "reservation": key, "task": record.get("task"),
                "prompt": record["prompt"], "reference": record.get("reference"),
                "left": record["outputs"][left]["text"], "right": record["outputs"][right]["text"], **counts}

    def rate(self, reservation: str, choice: str) -> dict:
        """Append the rating of a reserved prompt. One rated meanwhile (by another server on this
        directory: two reviewers) is refused: the first rating stands, none is overwritten."""
        if choice not in CHOICES:
            raise ReviewError(f"choice must be one of {', '.join(CHOICES)}")
        with self.lock:
            held = self.reserved.pop(reservation, None)
            if held is None:
                raise ReviewError(f"unknown or expired pair (a tab keeps one for {self.reserve_seconds / 60:g} "
                                  "minutes); load the next one")
            winner = {"left": held.left, "right": held.right}.get(choice, choice)
            rating = {"index": held.index, "pair": list(held.pair), "left": held.left, "right": held.right,
                      "choice": choice, "winner": winner, "time": round(time.time(), 3)}
            with writing(self.ratings_path, "the review's ratings"), self._folder_locked():  # OSError: OutputError
                if held.index in self._rated(held.pair):
                    raise ReviewError(f"prompt {held.index} is already rated for {held.pair[0]} against "
                                      f"{held.pair[1]}; its first rating stands: load the next one")
                append_line(self.ratings_path, json.dumps(rating), what="the review's ratings", root=self.directory)
        return rating

    def summary(self) -> dict:
        with self.lock:
            ratings = self._ratings()
        return {"pairs": summarise(ratings), "text": summary_text(ratings), "ratings": len(ratings),
                "note": WIN_RATE_NOTE}

    def _rated(self, pair: tuple[str, str]) -> set[int]:
        return {r["index"] for r in self._ratings() if tuple(r["pair"]) == pair}

    def _ratings(self) -> list[dict]:
        """The ratings (`read_ratings`), read again only when the file changed (inode, size, time):
        the page asks at every pair, and a damaged line is warned about once, not at every click."""
        try:
            info = os.lstat(self.ratings_path)
            key: Optional[tuple] = (info.st_ino, info.st_size, info.st_mtime_ns)
        except OSError:
            key = None
        if key is None or key != self._ratings_key or os.path.islink(os.path.dirname(self.ratings_path)):
            self._ratings_read, self._ratings_key = read_ratings(self.ratings_path), key
        return self._ratings_read

    @contextlib.contextmanager
    def _folder_locked(self) -> Iterator[None]:
        """An exclusive flock on the review folder while a rating is checked against the file and
        appended: a second server on the same directory (two reviewers) cannot append the same
        prompt's rating in between (append_line's own lock keeps lines whole, not this check).
        The folder is reached as append_line reaches it: created if missing, never through a link."""
        folder = os.path.dirname(self.ratings_path)
        with directory_fd(folder, self.directory, "the review's ratings") as fd:
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break  # no flock on directories on this file system (NFS): this server's lock alone
                    if time.monotonic() > deadline:
                        raise ReviewError(f"{folder} has been locked by another process for {LOCK_WAIT_SECONDS:g} "
                                          "s; try again") from None
                    time.sleep(0.02)
            yield


def _waiting_message(remaining: int, reserve_seconds: float) -> str:
    if not remaining:
        return "All pairs rated: see Summary."
    return (f"The {remaining} prompt(s) left are being rated in another tab or by another reviewer; one not rated "
            f"within {reserve_seconds / 60:g} minutes is handed out again.")


# ------------------------------------------------------------------------------ the page

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
nav button{margin-right:.5em} .tab{display:none} .tab.on{display:block}
table{border-collapse:collapse;width:100%} td,th{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}
pre{white-space:pre-wrap;margin:0;font-family:ui-monospace,monospace} .right{background:#e8f6e8} .wrong{background:#fbeaea}
.cut{color:#a60} .pane{display:inline-block;box-sizing:border-box;width:48%;vertical-align:top;border:1px solid #999;padding:.6em;margin:.3em 1% .3em 0}
.meta{color:#555;font-size:.9em} #choices button{font-size:1.1em;margin:.4em} .error{color:#b00}
#summary-table td:not(:first-child){text-align:right}
"""

BODY = """
<h1>distft review <span class="meta" id="source"></span></h1>
<p class="error" id="error"></p><p class="meta" id="loading">Loading the predictions...</p>
<nav><button id="tab-browse">Browse</button><button id="tab-blind">Blind</button><button id="tab-summary">Summary</button></nav>
<section id="browse" class="tab on">
<p>Task <select id="f-task"><option value="">all</option></select>
Exact match of <select id="f-model"></select> <select id="f-em"><option value="">any</option>
<option value="1">right</option><option value="0">wrong</option></select>
<label><input type="checkbox" id="f-disagree"> disagreements only</label> <span id="count" class="meta"></span></p>
<table id="rows"><thead></thead><tbody></tbody></table></section>
<section id="blind" class="tab"><p>Compare <select id="p-a"></select> with <select id="p-b"></select>
<span class="meta" id="progress"></span></p>
<div id="pair"><p class="meta" id="p-task"></p><pre id="p-prompt"></pre><p class="meta">Reference:</p><pre id="p-ref"></pre>
<div class="pane"><b>Left</b><pre id="left"></pre></div><div class="pane"><b>Right</b><pre id="right"></pre></div>
<div id="choices"><button id="btn-left">Left is better</button><button id="btn-right">Right is better</button>
<button id="btn-tie">Tie</button><button id="btn-both_bad">Both bad</button></div></div>
<p id="p-note" class="error"></p><p id="p-done" class="meta"></p></section>
<section id="summary" class="tab"><table id="summary-table"><thead><tr><th>pair</th><th>ratings</th><th>a wins</th>
<th>b wins</th><th>ties</th><th>both bad</th><th>b's win rate (95% CI)</th></tr></thead><tbody></tbody></table>
<p class="meta" id="summary-note"></p></section>
"""

# Every text from the predictions or ratings (attacker-controlled: the run directory is not trusted)
# goes into the page through textContent, never as HTML; the API is reached with the cookie that
# the first visit's ?token= set.
SCRIPT = """
"use strict";
const $ = id => document.getElementById(id);
let data = null, reservation = null;
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
async function api(path, options) {
  const res = await fetch(path, options); let body;
  try { body = await res.json(); } catch (e) { body = {}; }
  if (!res.ok && !body.error) body.error = res.status + " " + res.statusText;
  return body;
}
function show(name) { for (const t of ["browse", "blind", "summary"]) $(t).classList.toggle("on", t === name);
  if (name === "summary") loadSummary(); if (name === "blind") loadPair(); }
for (const t of ["browse", "blind", "summary"]) $("tab-" + t).onclick = () => show(t);
function option(sel, value) { const o = el("option", value); o.value = value; sel.appendChild(o); }
function disagree(r) { const outs = Object.values(r.outputs);
  return new Set(outs.map(o => o.text.trim())).size > 1 || new Set(outs.map(o => o.exact_match)).size > 1; }
function scores(o) { const m = [];
  if (o.exact_match !== undefined) m.push("em " + o.exact_match);
  if (typeof o.f1 === "number") m.push("f1 " + o.f1.toFixed(2));
  return m.join(" ") + (o.truncated ? " (cut)" : ""); }
function render() {
  const task = $("f-task").value, model = $("f-model").value, em = $("f-em").value, dis = $("f-disagree").checked;
  const body = $("rows").tBodies[0]; body.replaceChildren(); let n = 0;
  for (const r of data.records) {
    if (task && r.task !== task) continue;
    if (em !== "" && String(r.outputs[model].exact_match ?? "") !== em) continue;
    if (dis && !disagree(r)) continue;
    n++; const tr = el("tr"); tr.dataset.index = r.index;
    tr.appendChild(el("td", r.task ?? "")); const p = el("td"); p.appendChild(el("pre", r.prompt)); tr.appendChild(p);
    const ref = el("td"); ref.appendChild(el("pre", r.reference ?? "")); tr.appendChild(ref);
    for (const label of data.labels) { const o = r.outputs[label], td = el("td");
      td.appendChild(el("pre", o.text)); if (o.exact_match !== undefined) td.className = o.exact_match ? "right" : "wrong";
      td.appendChild(el("div", scores(o), "meta")); tr.appendChild(td); }
    body.appendChild(tr); }
  $("count").textContent = n + " of " + data.records.length + " prompts";
}
async function load() {
  data = await api("/api/predictions");
  $("loading").hidden = true;
  if (data.error) { $("error").textContent = data.error; return; }
  $("source").textContent = data.predictions;
  const head = el("tr"); for (const h of ["task", "prompt", "reference", ...data.labels]) head.appendChild(el("th", h));
  $("rows").tHead.appendChild(head);
  for (const t of [...new Set(data.records.map(r => r.task).filter(t => typeof t === "string" && t))].sort()) option($("f-task"), t);
  for (const l of data.labels) { option($("f-model"), l); option($("p-a"), l); option($("p-b"), l); }
  $("f-model").value = data.labels[data.labels.length - 1]; $("p-a").value = data.pair[0]; $("p-b").value = data.pair[1];
  for (const id of ["f-task", "f-model", "f-em", "f-disagree"]) $(id).onchange = render;
  $("p-a").onchange = $("p-b").onchange = loadPair;
  render();
}
async function loadPair() {
  const q = new URLSearchParams({a: $("p-a").value, b: $("p-b").value, release: reservation ?? ""});
  reservation = null;
  const res = await api("/api/pair?" + q);
  if (res.error) { $("p-done").textContent = res.error; $("pair").hidden = true; return; }
  $("progress").textContent = res.rated + " rated, " + res.remaining + " to go, " + res.identical + " identical (not asked)";
  if (res.done || res.waiting) { $("pair").hidden = true; $("p-done").textContent = res.message; return; }
  reservation = res.reservation; $("pair").hidden = false; $("p-done").textContent = "";
  $("p-task").textContent = res.task ? "task: " + res.task : ""; $("p-prompt").textContent = res.prompt;
  $("p-ref").textContent = res.reference ?? ""; $("left").textContent = res.left; $("right").textContent = res.right;
}
async function rate(choice) {
  if (!reservation) return;
  const sent = reservation; reservation = null;
  const res = await api("/api/rate", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({reservation: sent, choice})});
  $("p-note").textContent = res.error ? "Not saved: " + res.error : "";
  loadPair();
}
for (const c of ["left", "right", "tie", "both_bad"]) $("btn-" + c).onclick = () => rate(c);
async function loadSummary() {
  const res = await api("/api/summary"), body = $("summary-table").tBodies[0];
  body.replaceChildren();
  if (res.error) { $("summary-note").textContent = res.error; return; }
  for (const p of res.pairs) { const tr = el("tr");
    for (const cell of ["a=" + p.a + ", b=" + p.b, p.n, p.wins_a, p.wins_b, p.ties, p.both_bad, p.win_rate_text])
      tr.appendChild(el("td", cell));
    body.appendChild(tr); }
  $("summary-note").textContent = res.pairs.length ? res.note : "No ratings yet.";
}
load();
"""

PAGE = ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>distft review</title>'
        f"<style>{STYLE}</style></head><body>{BODY}<script>{SCRIPT}</script></body></html>\n")


def _csp_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


# The page runs its own script and style only (by their hashes: no inline code injected into it
# would run), talks to its own server only, and cannot be framed by another site (clickjacking).
CSP = (f"default-src 'none'; script-src {_csp_source(SCRIPT)}; style-src {_csp_source(STYLE)}; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                    ("Referrer-Policy", "no-referrer"), ("Content-Security-Policy", CSP))


# ------------------------------------------------------------------------------ who may ask


def url_host(host: str) -> str:
    """`host` as a URL and a Host header write it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_hosts(bind_host: str) -> frozenset[str]:
    """The names a request's Host may give: loopback's, and the address the server was told to
    bind. A name of the attacker's that resolves to 127.0.0.1 (DNS rebinding: their page, then
    same-origin with this one) is refused."""
    return frozenset({*LOOPBACK_HOSTS, url_host(bind_host).lower()})


def host_allowed(header: Optional[str], hosts: frozenset[str], port: int) -> bool:
    value = (header or "").strip().lower()
    return any(value in (host, f"{host}:{port}") for host in hosts)


def origin_allowed(header: Optional[str], hosts: frozenset[str], port: int) -> bool:
    """A POST's Origin, when the browser sends one, is the page's own: another site's page cannot
    send this one's."""
    return header is None or header.strip().lower() in {f"http://{host}:{port}" for host in hosts}


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> Optional[str]:
    """What serving on `host` exposes, when it is not this machine only (None for loopback)."""
    if is_loopback(host):
        return None
    return (f"serving on {host}, not on this machine only: anyone who can reach that address and has the printed URL "
            "(its token) can read every prediction and rate them; the page is plain HTTP, so the URL crosses the "
            "network unencrypted")


def cookie_name(port: int) -> str:
    # Browsers send a host's cookies to all its ports: one name per port keeps two pages' tokens apart.
    return f"distft-review-{port}"


def presented_tokens(headers: Any, query: dict[str, str], port: int) -> dict[str, str]:
    """The tokens a request carries, by where: the URL's `?token=`, `Authorization: token ...`, the cookie."""
    scheme, _, value = (headers.get("Authorization") or "").strip().partition(" ")
    cookies = (part.strip().partition("=") for part in ";".join(headers.get_all("Cookie") or []).split(";"))
    tokens = {"query": query.get("token", ""), "header": value.strip() if scheme.lower() == "token" else "",
              "cookie": next((v for k, _, v in cookies if k == cookie_name(port)), "")}
    return {where: token for where, token in tokens.items() if token}


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


# ------------------------------------------------------------------------------ the server


def make_server(review: Review, host: str = "127.0.0.1", port: int = 0,
                token: Optional[str] = None) -> http.server.ThreadingHTTPServer:
    """The page's server, bound to host:port (0: a free port), answering only requests that carry
    `token` (default: a new random one; the server's `token`) and name an allowed Host."""
    token = token or secrets.token_urlsafe(32)
    hosts = allowed_hosts(host)

    class Handler(http.server.BaseHTTPRequestHandler):
        set_cookie = False

        def log_message(self, *args):  # quiet: the page polls, and request lines carry the token
            pass

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            for name, value in (("Content-Type", kind), ("Content-Length", str(len(body))), *SECURITY_HEADERS):
                self.send_header(name, value)
            if self.set_cookie:
                self.send_header("Set-Cookie", f"{cookie_name(self._port)}={token}; HttpOnly; SameSite=Strict; Path=/")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value: Any, status: int = 200) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        @property
        def _port(self) -> int:
            return self.server.server_address[1]

        def _authorised(self, query: dict[str, str]) -> bool:
            """The request names an allowed Host and carries the token (else it is answered 403);
            a token in the URL also sets the cookie, for the page's own requests."""
            if not host_allowed(self.headers.get("Host"), hosts, self._port):
                self._json({"error": f"this page answers requests to {', '.join(sorted(hosts))} only"}, 403)
                return False
            valid = {where for where, given in presented_tokens(self.headers, query, self._port).items()
                     if token_matches(given, token)}
            if not valid:
                self._json({"error": "no valid token: open the URL that `python -m distft.review` printed (it ends "
                                     "in ?token=...)"}, 403)
                return False
            self.set_cookie = "query" in valid
            return True

        def do_GET(self):  # noqa: N802 - the http.server API
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if not self._authorised(query):
                return
            try:
                if url.path == "/":
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif url.path == "/api/predictions":
                    self._json({"predictions": review.predictions_path, "labels": review.labels,
                                "pair": review.default_pair(), "records": review.records})
                elif url.path == "/api/pair":
                    a, b = review.default_pair()
                    self._json(review.next_pair(query.get("a", a), query.get("b", b), query.get("release", "")))
                elif url.path == "/api/summary":
                    self._json(review.summary())
                else:
                    self._json({"error": "not found"}, 404)
            except ReviewError as err:
                self._json({"error": str(err)}, 400)

        def do_POST(self):  # noqa: N802
            url = urlparse(self.path)
            if not self._authorised({k: v[0] for k, v in parse_qs(url.query).items()}):
                return
            if not origin_allowed(self.headers.get("Origin"), hosts, self._port):
                return self._json({"error": "a request from another site's page"}, 403)
            if self.headers.get_content_type() != "application/json":  # a cross-site form cannot send JSON
                return self._json({"error": "the body must be application/json"}, 415)
            if url.path != "/api/rate":
                return self._json({"error": "not found"}, 404)
            try:
                body = self._body()
                self._json(review.rate(str(body.get("reservation", "")), str(body.get("choice", ""))))
            except ReviewError as err:
                self._json({"error": str(err)}, 400)
            except OutputError as err:  # the ratings file cannot be written (a planted link, a full disk)
                self._json({"error": f"the rating was not saved: {err}"}, 500)

        def _body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length", 0))
                if not 0 <= length <= MAX_BODY:
                    raise ValueError
                body = json.loads(self.rfile.read(length) or b"{}")
            except (ValueError, RecursionError):
                raise ReviewError(f"the body must be a JSON object of at most {MAX_BODY} bytes") from None
            if not isinstance(body, dict):
                raise ReviewError("the body must be a JSON object")
            return body

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.token = token
    return server


def review_url(server: http.server.ThreadingHTTPServer, host: str) -> str:
    """The page's address with its token: printed once, the only place the token is shown."""
    return f"http://{url_host(host)}:{server.server_address[1]}/?token={server.token}"
