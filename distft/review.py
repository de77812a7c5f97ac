"""`python -m distft.review RUN_OR_COMPARE_DIR`: read every prediction side by side, and rate them blind.

A local web page for the manual review of model outputs, on the standard library's HTTP server
(no framework, no build step, nothing fetched: it works offline):
- bound to 127.0.0.1 (`--host` to change it, at one's own risk), on a random free port unless
  `--port`; it prints the address and serves until Ctrl-C;
- read-only, except for its own ratings file `<dir>/review/ratings.jsonl`, one JSON line per
  rating, appended;
- **Browse**: every prompt of the predictions file (`eval_report.predictions.jsonl` of a run,
  `compare_report.predictions.jsonl` of `distft.compare`, or `--predictions FILE`), reference and
  each model's answer with its scores, filtered by task, by one model's exact match, and to the
  prompts where the models disagree (different answers, or one right where another is wrong);
- **Blind**: two models' answers to one prompt, in random order, unlabelled; the reviewer picks the
  better one, a tie, or both bad. Prompts where the two answers are identical are not asked;
- **Summary** (also `--summary`, printed without serving): per pair of models, the ratings as a
  win rate among the decided ones with a 95% Wilson interval, and the ties and both-bad counts.
  A prompt rated again counts once, with its last rating.
"""

from __future__ import annotations

import argparse
import http.server
import json
import math
import os
import random
import secrets
import sys
import threading
import time
from typing import Any, Optional
from urllib.parse import parse_qs, urlparse

PREDICTION_FILES = ("eval_report.predictions.jsonl", "compare_report.predictions.jsonl")
RATINGS = os.path.join("review", "ratings.jsonl")
CHOICES = ("left", "right", "tie", "both_bad")


class ReviewError(Exception):
    """A directory without predictions, or a damaged predictions file."""


def find_predictions(directory: str) -> str:
    for name in PREDICTION_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise ReviewError(f"{directory} has no predictions file ({' or '.join(PREDICTION_FILES)}): give a finished run "
                      "directory, a `python -m distft.compare` directory, or --predictions FILE")


def read_predictions(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["outputs"]  # noqa: B018 - the one key every record has
            except (ValueError, KeyError, TypeError):
                raise ReviewError(f"{path}: line {number} is not a prediction record") from None
            records.append(record)
    if not records:
        raise ReviewError(f"{path} holds no predictions")
    return records


def wilson(wins: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion wins/n (95% for z=1.96); (0, 1) for n=0."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def read_ratings(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(ratings: list[dict]) -> list[dict]:
    """Per pair of models (in the order first rated): n, wins of each, ties, both bad, the second
    model's win rate among the decided ratings and its 95% Wilson interval. The last rating of
    each (pair, prompt) counts."""
    last: dict[tuple, dict] = {}
    for rating in ratings:
        pair = tuple(rating["pair"])
        last[(pair, rating["index"])] = rating
    pairs: dict[tuple, dict] = {}
    for (pair, _), rating in last.items():
        entry = pairs.setdefault(pair, {"a": pair[0], "b": pair[1], "n": 0, "wins_a": 0, "wins_b": 0, "ties": 0,
                                        "both_bad": 0})
        entry["n"] += 1
        winner = rating["winner"]
        key = {pair[0]: "wins_a", pair[1]: "wins_b", "tie": "ties", "both_bad": "both_bad"}[winner]
        entry[key] += 1
    for entry in pairs.values():
        decided = entry["wins_a"] + entry["wins_b"]
        entry["win_rate_b"] = entry["wins_b"] / decided if decided else None
        entry["ci_b"] = list(wilson(entry["wins_b"], decided))
    return list(pairs.values())


def summary_text(ratings: list[dict]) -> str:
    rows = summarise(ratings)
    if not rows:
        return "No ratings yet."
    lines = ["| pair | ratings | a wins | b wins | ties | both bad | b's win rate (95% CI) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rate = "n/a" if r["win_rate_b"] is None else f"{r['win_rate_b']:.2f} ({r['ci_b'][0]:.2f}-{r['ci_b'][1]:.2f})"
        lines.append(f"| a={r['a']}, b={r['b']} | {r['n']} | {r['wins_a']} | {r['wins_b']} | {r['ties']} | "
                     f"{r['both_bad']} | {rate} |")
    lines += ["", "Win rate: b's share of the ratings that picked a side (ties and both-bad left out), with its "
              "Wilson score interval."]
    return "\n".join(lines)


class Review:
    """The state behind the page: the predictions, the ratings file, the blind pairs handed out."""

    def __init__(self, predictions: str, ratings: str, seed: Optional[int] = None):
        self.predictions_path, self.ratings_path = predictions, ratings
        self.records = read_predictions(predictions)
        self.labels = list(self.records[0]["outputs"])
        self.random = random.Random(seed)
        self.pending: dict[str, tuple[int, str, str, tuple[str, str]]] = {}
        self.lock = threading.Lock()

    def default_pair(self) -> tuple[str, str]:
        if "base" in self.labels and len(self.labels) > 1:
            return "base", [label for label in self.labels if label != "base"][-1]
        return self.labels[0], self.labels[-1]

    def next_pair(self, a: str, b: str) -> dict:
        """An unrated prompt where a's and b's answers differ, the two in random order."""
        if a not in self.labels or b not in self.labels or a == b:
            raise ReviewError(f"pick two different models of {', '.join(self.labels)}")
        with self.lock:
            rated = {r["index"] for r in read_ratings(self.ratings_path) if tuple(r["pair"]) == (a, b)}
            todo = [r for r in self.records if r["index"] not in rated
                    and r["outputs"][a]["text"].strip() != r["outputs"][b]["text"].strip()]
            identical = sum(r["outputs"][a]["text"].strip() == r["outputs"][b]["text"].strip() for r in self.records)
            if not todo:
                return {"done": True, "rated": len(rated), "identical": identical}
            record = todo[0]
            left, right = (a, b) if self.random.random() < 0.5 else (b, a)
            token = secrets.token_hex(8)
            self.pending[token] = (record["index"], left, right, (a, b))
        return {"done": False, "token": token, "task": record.get("task"), "prompt": record["prompt"],
                "reference": record["reference"], "left": record["outputs"][left]["text"],
                "right": record["outputs"][right]["text"], "remaining": len(todo), "rated": len(rated),
                "identical": identical}

    def rate(self, token: str, choice: str) -> dict:
        if choice not in CHOICES:
            raise ReviewError(f"choice must be one of {', '.join(CHOICES)}")
        with self.lock:
            if token not in self.pending:
                raise ReviewError("unknown or already rated pair; load the next one")
            index, left, right, pair = self.pending.pop(token)
            winner = {"left": left, "right": right}.get(choice, choice)
            rating = {"index": index, "pair": list(pair), "left": left, "right": right, "choice": choice,
                      "winner": winner, "time": round(time.time(), 3)}
            from distft.tracking import append_line

            os.makedirs(os.path.dirname(self.ratings_path), exist_ok=True)
            append_line(self.ratings_path, json.dumps(rating), what="the review's ratings")
        return rating

    def summary(self) -> dict:
        ratings = read_ratings(self.ratings_path)
        return {"pairs": summarise(ratings), "text": summary_text(ratings), "ratings": len(ratings)}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distft review</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}
nav button{margin-right:.5em} .tab{display:none} .tab.on{display:block}
table{border-collapse:collapse;width:100%} td,th{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}
pre{white-space:pre-wrap;margin:0;font-family:ui-monospace,monospace} .right{background:#e8f6e8} .wrong{background:#fbeaea}
.cut{color:#a60} .pane{display:inline-block;box-sizing:border-box;width:48%;vertical-align:top;border:1px solid #999;padding:.6em;margin:.3em 1% .3em 0}
.meta{color:#555;font-size:.9em} #choices button{font-size:1.1em;margin:.4em}
</style></head><body>
<h1>distft review <span class="meta" id="source"></span></h1>
<nav><button id="tab-browse">Browse</button><button id="tab-blind">Blind</button><button id="tab-summary">Summary</button></nav>
<section id="browse" class="tab on">
<p>Task <select id="f-task"><option value="">all</option></select>
Exact match of <select id="f-model"></select> <select id="f-em"><option value="">any</option>
<option value="1">right</option><option value="0">wrong</option></select>
<label><input type="checkbox" id="f-disagree"> disagreements only</label> <span id="count" class="meta"></span></p>
<table id="rows"><thead></thead><tbody></tbody></table></section>
<section id="blind" class="tab"><p>Compare <select id="p-a"></select> with <select id="p-b"></select>
<span class="meta" id="progress"></span></p>
<div id="pair"><p class="meta" id="p-task"></p><pre id="p-prompt"></pre><p class="meta">Reference: <span id="p-ref"></span></p>
<div class="pane"><b>Left</b><pre id="left"></pre></div><div class="pane"><b>Right</b><pre id="right"></pre></div>
<div id="choices"><button id="btn-left">Left is better</button><button id="btn-right">Right is better</button>
<button id="btn-tie">Tie</button><button id="btn-both_bad">Both bad</button></div></div>
<p id="p-done" class="meta"></p></section>
<section id="summary" class="tab"><pre id="summary-text"></pre></section>
<script>
"use strict";
const $ = id => document.getElementById(id);
let data = null, token = null;
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function show(name) { for (const t of ["browse", "blind", "summary"]) $(t).classList.toggle("on", t === name);
  if (name === "summary") loadSummary(); if (name === "blind") loadPair(); }
for (const t of ["browse", "blind", "summary"]) $("tab-" + t).onclick = () => show(t);
function option(sel, value, text) { const o = el("option", text ?? value); o.value = value; sel.appendChild(o); }
function disagree(r) { const outs = Object.values(r.outputs);
  return new Set(outs.map(o => o.text.trim())).size > 1 || new Set(outs.map(o => o.exact_match)).size > 1; }
function render() {
  const task = $("f-task").value, model = $("f-model").value, em = $("f-em").value, dis = $("f-disagree").checked;
  const body = $("rows").tBodies[0]; body.replaceChildren(); let n = 0;
  for (const r of data.records) {
    if (task && r.task !== task) continue;
    if (em !== "" && String(r.outputs[model].exact_match ?? "") !== em) continue;
    if (dis && !disagree(r)) continue;
    n++; const tr = el("tr"); tr.dataset.index = r.index;
    tr.appendChild(el("td", r.task ?? "")); const p = el("td"); p.appendChild(el("pre", r.prompt)); tr.appendChild(p);
    tr.appendChild(el("td", r.reference));
    for (const label of data.labels) { const o = r.outputs[label], td = el("td");
      td.appendChild(el("pre", o.text)); if (o.exact_match !== undefined) td.className = o.exact_match ? "right" : "wrong";
      const m = [o.exact_match !== undefined ? "em " + o.exact_match : "", o.f1 !== undefined ? "f1 " + o.f1.toFixed(2) : ""].join(" ");
      td.appendChild(el("div", m + (o.truncated ? " (cut)" : ""), "meta")); tr.appendChild(td); }
    body.appendChild(tr); }
  $("count").textContent = n + " of " + data.records.length + " prompts";
}
async function load() {
  data = await (await fetch("/api/predictions")).json();
  $("source").textContent = data.predictions;
  const head = el("tr"); for (const h of ["task", "prompt", "reference", ...data.labels]) head.appendChild(el("th", h));
  $("rows").tHead.appendChild(head);
  for (const t of [...new Set(data.records.map(r => r.task).filter(t => t))].sort()) option($("f-task"), t);
  for (const l of data.labels) { option($("f-model"), l); option($("p-a"), l); option($("p-b"), l); }
  $("f-model").value = data.labels[data.labels.length - 1]; $("p-a").value = data.pair[0]; $("p-b").value = data.pair[1];
  for (const id of ["f-task", "f-model", "f-em", "f-disagree"]) $(id).onchange = render;
  $("p-a").onchange = $("p-b").onchange = loadPair;
  render();
}
async function loadPair() {
  const q = new URLSearchParams({a: $("p-a").value, b: $("p-b").value});
  const res = await (await fetch("/api/pair?" + q)).json();
  if (res.error) { $("p-done").textContent = res.error; $("pair").hidden = true; return; }
  $("progress").textContent = res.rated + " rated, " + (res.remaining ?? 0) + " to go, " + res.identical + " identical (not asked)";
  if (res.done) { token = null; $("pair").hidden = true; $("p-done").textContent = "All pairs rated: see Summary."; return; }
  token = res.token; $("pair").hidden = false; $("p-done").textContent = "";
  $("p-task").textContent = res.task ? "task: " + res.task : ""; $("p-prompt").textContent = res.prompt;
  $("p-ref").textContent = res.reference; $("left").textContent = res.left; $("right").textContent = res.right;
}
async function rate(choice) {
  if (!token) return;
  const sent = token; token = null;
  await fetch("/api/rate", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({token: sent, choice})});
  loadPair();
}
for (const c of ["left", "right", "tie", "both_bad"]) $("btn-" + c).onclick = () => rate(c);
async function loadSummary() { $("summary-text").textContent = (await (await fetch("/api/summary")).json()).text; }
load();
</script></body></html>
"""


def make_server(review: Review, host: str = "127.0.0.1", port: int = 0) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: the page polls
            pass

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value: Any, status: int = 200) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def do_GET(self):  # noqa: N802 - the http.server API
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                if url.path == "/":
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif url.path == "/api/predictions":
                    self._json({"predictions": review.predictions_path, "labels": review.labels,
                                "pair": review.default_pair(), "records": review.records})
                elif url.path == "/api/pair":
                    a, b = review.default_pair()
                    self._json(review.next_pair(query.get("a", a), query.get("b", b)))
                elif url.path == "/api/summary":
                    self._json(review.summary())
                else:
                    self._json({"error": "not found"}, 404)
            except ReviewError as err:
                self._json({"error": str(err)}, 400)

        def do_POST(self):  # noqa: N802
            if urlparse(self.path).path != "/api/rate":
                return self._json({"error": "not found"}, 404)
            try:
                length = min(int(self.headers.get("Content-Length", 0)), 1 << 16)
                body = json.loads(self.rfile.read(length) or b"{}")
                self._json(review.rate(str(body.get("token", "")), str(body.get("choice", ""))))
            except (ReviewError, ValueError) as err:
                self._json({"error": str(err)}, 400)

    return http.server.ThreadingHTTPServer((host, port), Handler)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distft.review",
                                     description="Read predictions side by side and rate them blind, in a local page")
    parser.add_argument("directory", metavar="RUN_OR_COMPARE_DIR")
    parser.add_argument("--predictions", help="a predictions file (default: the directory's)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a random free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--summary", action="store_true", help="print the ratings' summary and exit")
    args = parser.parse_args(argv)
    directory = os.path.abspath(os.path.expanduser(args.directory))
    ratings = os.path.join(directory, RATINGS)
    if args.summary:
        print(summary_text(read_ratings(ratings)))
        return 0
    try:
        review = Review(args.predictions or find_predictions(directory), ratings)
    except (ReviewError, OSError) as err:
        print(f"distft: {err}", file=sys.stderr)
        return 2
    server = make_server(review, args.host, args.port)
    print(f"review: http://{args.host}:{server.server_address[1]}/ ({len(review.records)} prompts, models "
          f"{', '.join(review.labels)}; ratings go to {ratings}); Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
