"""Data at scale: distft's pipeline against the raw tokenizer, across cores, cached, and in memory per rank.

Rows: Alpaca-format rows of generated English-like text (~230 tokens each, like the real Alpaca
set under a 32k vocabulary), written to a JSON Lines file; tokenizer: the repo's LLaMA-style
SentencePiece BPE (distft/data/tokenizers.py, `llama2`) trained to `--vocab` entries. Every
figure is a ratio against a baseline measured in the same run:

1. one core (sched_setaffinity, one tokenizer thread): `prepare_data` tokens/s (read the file,
   clean with counts and de-duplication, template, tokenize, mask, split) / the raw batched
   tokenizer (`tokenizer(texts)`) on the same rows' full texts. Target >= 0.8.
2. cores: `prepare_data` with data.num_proc = every core against num_proc=1 on one core, in
   alternating pairs. Target: near-linear; the machine's own ceiling is measured beside it (the
   raw tokenizer on the same texts in equal shares, one process per core).
3. cache: a run's data start-up (fingerprint, cache, the first epoch's packing) when the cache is
   built, against a rerun that finds it. Target: the rerun <= 5% of the first. And the rerun's
   checks of the cache (every file's xxh3 checksum, every id against the vocabulary:
   `CacheResult.verify_s`) against the whole rerun. Target <= 5%.
4. memory: `--ranks` processes read the same `--rows`-row cache and build their epoch, as ranks do;
   each one's growth of private memory (RssAnon: what the process holds itself; the cache's pages
   are file-backed, shared through the page cache, counted as RssFile). Target <= 1 GB per rank.

    python bench/data_pipeline.py [--rows 1000000] [--ratio-rows 50000] [--vocab 32000] [--record]

Also the packing fill of best_fit and in_order on the shipped synthetic data (target >= 99% non-pad).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402

WORDS = ("the model data token train step batch rank node cluster memory cache shard layer weight "
         "gradient optimizer schedule warmup learning rate loss eval sample packing sequence length "
         "question answer explain describe summarize translate list compare reason because however "
         "therefore example system user assistant instruction input output response correct simple "
         "river mountain city history science language music garden kitchen travel health energy").split()


def alpaca_rows(n: int, seed: int = 0):
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        for i in range(0, len(words), rng.randint(8, 14)):
            words[i] = words[i].capitalize()
        return " ".join(words) + "."

    for i in range(n):
        yield {"instruction": text(5, 20), "input": text(0, 25) if i % 3 else "", "output": text(30, 80),
               "id": i}


def write_rows(path: str, n: int) -> None:
    with open(path, "w") as f:
        for row in alpaca_rows(n):
            f.write(json.dumps(row) + "\n")


def rss() -> dict:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


def data_cfg(path: str, cache_dir: str, num_proc: int = 1):
    from distft.config import DataConfig

    return DataConfig(source="jsonl", path=path, template="alpaca", max_seq_len=2048, num_proc=num_proc,
                      cache_dir=cache_dir)


# ---------------------------------------------------------------- the measurements, each its own process


def measure_one_core(path: str, tokenizer_dir: str) -> dict:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from distft.config import ModelConfig
    from distft.data.pipeline import prepare_data
    from distft.model.build import load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer=tokenizer_dir))
    cfg = data_cfg(path, "", num_proc=1)
    texts = _rendered_texts(path, tokenizer_dir)
    started = time.perf_counter()
    raw_tokens = sum(map(len, tok(texts, add_special_tokens=False)["input_ids"]))
    raw_s = time.perf_counter() - started
    started = time.perf_counter()
    data = prepare_data(cfg, tok)
    pipe_s = time.perf_counter() - started
    return {"raw_tokens": raw_tokens, "raw_s": raw_s, "pipe_s": pipe_s,
            "pipe_tokens": data.train.token_count + data.eval.token_count, "rows": len(texts)}


def _rendered_texts(path: str, tokenizer_dir: str) -> list[str]:
    """The rows' full texts as the template renders them: what the raw tokenizer baselines encode."""
    from distft.config import ModelConfig
    from distft.data.pipeline import load_rows, to_canonical
    from distft.data.templates import render_row
    from distft.model.build import load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer=tokenizer_dir))
    cfg = data_cfg(path, "", num_proc=1)
    raw, _ = load_rows(cfg)
    return [render_row(to_canonical(r.value, cfg.format, cfg)[1], "alpaca", cfg.template, tok).text for r in raw]


def _raw_share(args: tuple) -> float:
    """Seconds the raw batched tokenizer takes on one share of the texts, on one thread."""
    tokenizer_dir, texts = args
    from distft.config import ModelConfig
    from distft.model.build import load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer=tokenizer_dir))
    started = time.perf_counter()
    tok(texts, add_special_tokens=False)
    return time.perf_counter() - started


def measure_raw_split(path: str, tokenizer_dir: str, processes: int) -> dict:
    """The machine's own scaling, the cores figure's ceiling: the raw batched tokenizer on the same
    texts in `processes` equal shares, one single-threaded process each (started beforehand), timed
    until the last share is done; processes=1: all texts on one pinned core."""
    import multiprocessing

    texts = _rendered_texts(path, tokenizer_dir)
    os.environ["RAYON_NUM_THREADS"] = "1"
    if processes == 1:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        return {"seconds": _raw_share((tokenizer_dir, texts))}
    size = -(-len(texts) // processes)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(time.sleep, [0.0] * processes)  # started and imported before the clock runs
        seconds = pool.map(_raw_share, [(tokenizer_dir, texts[i : i + size]) for i in range(0, len(texts), size)])
    return {"seconds": max(seconds)}


def measure_processes(path: str, tokenizer_dir: str, num_proc: int, pinned: int = 0) -> dict:
    """prepare_data with data.num_proc=num_proc; pinned=1: on one core (the cores figure's baseline)."""
    if pinned:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from distft.config import ModelConfig
    from distft.data.pipeline import prepare_data
    from distft.model.build import load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer=tokenizer_dir))
    started = time.perf_counter()
    data = prepare_data(data_cfg(path, "", num_proc=num_proc), tok)
    return {"seconds": time.perf_counter() - started, "tokens": data.train.token_count + data.eval.token_count,
            "digest": hashlib.sha256(data.train.tokens.tobytes() + data.eval.tokens.tobytes()).hexdigest()}


def measure_rank(path: str, tokenizer_dir: str, cache_dir: str, rank: int, world: int) -> dict:
    """What a rank does with the data at start-up: the cache (built by rank 0 when missing), then
    its batches' first epoch (shuffle, best-fit packing), and a few micro-batches."""
    from distft.config import ModelConfig
    from distft.data.batching import TrainBatches
    from distft.data.cache import prepared
    from distft.data.pipeline import prepare_data
    from distft.model.build import load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer=tokenizer_dir))
    before = rss()
    started = time.perf_counter()
    result = prepared(data_cfg(path, cache_dir, num_proc=0), tok, 0, cache_dir, prepare_data, rank=rank)
    batches = TrainBatches(result.data.train, 4, 2048, True, tok.eos_token_id, seed=0, rank=rank, world_size=world)
    for _ in range(8):
        next(batches)
    seconds = time.perf_counter() - started
    after = rss()
    return {"seconds": seconds, "built": result.built, "verify_s": result.verify_s, "samples": len(result.data.train),
            "tokens": result.data.train.token_count, "rows_per_epoch": batches.rows_per_epoch,
            **{f"{k}_growth": after[k] - before[k] for k in before}}


def run_worker(kind: str, *args) -> dict:
    one_thread = kind == "one_core" or (kind in ("processes", "raw_split") and args[-1] == 1)
    env = {**os.environ, "RAYON_NUM_THREADS": "1"} if one_thread else None  # one tokenizer thread
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench worker {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def packing_fill() -> list[str]:
    from distft.config import DataConfig, SyntheticDataConfig
    from distft.data.batching import PACK_STRATEGIES, pack_index
    from distft.data.pipeline import prepare_data
    from distft.model.build import build_offline_tokenizer

    data = prepare_data(DataConfig(template="plain", synthetic=SyntheticDataConfig(num_examples=20000)),
                        build_offline_tokenizer())
    rows = ["| max_seq_len | strategy | rows | non-pad share |", "|---:|---|---:|---:|"]
    for seq in (256, 2048):
        for strategy in PACK_STRATEGIES:
            bounds = pack_index(data.train.lengths, seq, strategy)[1]
            rows.append(f"| {seq} | {strategy} | {len(bounds) - 1:,} | "
                        f"{data.train.token_count / ((len(bounds) - 1) * seq):.2%} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the cache and memory figures")
    parser.add_argument("--ratio-rows", type=int, default=50_000, help="rows of the one-core and cores figures")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3, help="alternating one-core / all-cores pairs")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        fn = {"one_core": measure_one_core, "processes": measure_processes, "rank": measure_rank,
              "raw_split": measure_raw_split}[kind]
        rest = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(fn(*rest)))
        return
    command = command_line()
    from distft.data.tokenizers import save_tokenizer

    work = tempfile.mkdtemp(prefix="distft-bench-data-")
    tokenizer_dir = str(save_tokenizer("llama2", os.path.join(work, "tokenizer"), vocab_size=args.vocab))
    small, large = os.path.join(work, "small.jsonl"), os.path.join(work, "large.jsonl")
    write_rows(small, args.ratio_rows)
    write_rows(large, args.rows)
    cores = len(os.sched_getaffinity(0))

    one = run_worker("one_core", small, tokenizer_dir)
    ratio = (one["pipe_tokens"] / one["pipe_s"]) / (one["raw_tokens"] / one["raw_s"])
    # The cores figure: alternating pairs (one pinned core, num_proc=1 | num_proc=cores), so a slow
    # spell of a shared machine falls on both sides; the median pair's ratio is the figure.
    pairs = []
    for _ in range(args.pairs):
        serial = run_worker("processes", small, tokenizer_dir, 1, 1)
        parallel = run_worker("processes", small, tokenizer_dir, cores, 0)
        assert serial["digest"] == parallel["digest"] and serial["tokens"] == parallel["tokens"] == one["pipe_tokens"]
        pairs.append((serial["seconds"] / parallel["seconds"], serial["seconds"], parallel["seconds"]))
    pairs.sort()
    speedup, serial_s, parallel_s = pairs[len(pairs) // 2]
    ceiling = sorted(run_worker("raw_split", small, tokenizer_dir, 1)["seconds"]
                     / run_worker("raw_split", small, tokenizer_dir, cores)["seconds"] for _ in range(args.pairs))
    ceiling_x = ceiling[len(ceiling) // 2]

    cache_dir = os.path.join(work, "cache")
    first = run_worker("rank", large, tokenizer_dir, cache_dir, 0, 1)
    rerun = run_worker("rank", large, tokenizer_dir, cache_dir, 0, 1)
    if rerun["built"]:  # its key changed: distft's data code (part of the key) was edited during the build
        raise SystemExit("bench: the rerun built the cache again instead of finding it: distft's data code, part "
                         "of the cache key, changed while the first build ran; run the bench on a tree nobody edits")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "rank", large, tokenizer_dir, cache_dir, str(r),
                               str(args.ranks)], stdout=subprocess.PIPE, text=True, cwd=REPO)
             for r in range(args.ranks)]
    ranks = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    cache_bytes = sum(os.path.getsize(os.path.join(first_dir, n)) for first_dir in
                      [os.path.join(cache_dir, d) for d in os.listdir(cache_dir) if "." not in d]
                      for n in os.listdir(first_dir))
    gib = 1 << 30
    table = "\n".join([
        "| figure | baseline | distft | ratio | target |", "|---|---:|---:|---:|---|",
        f"| one core: tokens/s ({one['rows']:,} rows, {one['pipe_tokens']:,} tokens) | raw batched tokenizer "
        f"{one['raw_tokens'] / one['raw_s']:,.0f} | prepare_data {one['pipe_tokens'] / one['pipe_s']:,.0f} | "
        f"{ratio:.2f} | >= 0.8 |",
        f"| {cores} cores: prepare_data seconds (median of {len(pairs)} pairs; ratios "
        f"{', '.join(f'{r:.2f}' for r, _, _ in pairs)}) | one core, num_proc=1 {serial_s:.1f} s | "
        f"num_proc={cores} {parallel_s:.1f} s | {speedup:.2f}x | ~{cores}x |",
        f"| {cores} cores: the machine's ceiling, the raw tokenizer in {cores} shares (median of {len(ceiling)}; "
        f"{', '.join(f'{r:.2f}' for r in ceiling)}) | - | - | {ceiling_x:.2f}x | distft / ceiling "
        f"{speedup / ceiling_x:.2f} |",
        f"| data start-up, {first['samples']:,} samples, {first['tokens']:,} tokens | cache built "
        f"{first['seconds']:.1f} s | cache found {rerun['seconds']:.1f} s | {rerun['seconds'] / first['seconds']:.1%} "
        "| <= 5% |",
        f"| the found cache's checks: checksums ({cache_bytes / gib:.2f} GiB, xxh3-64), ids against the vocabulary | "
        f"data start-up, cache found {rerun['seconds']:.2f} s | checks {rerun['verify_s']:.2f} s | "
        f"{rerun['verify_s'] / rerun['seconds']:.1%} | <= 5% |",
        *[f"| rank {r} of {args.ranks} reading the cache ({cache_bytes / gib:.2f} GiB) | - | private memory "
          f"+{x['RssAnon_growth'] / gib:.2f} GiB (file-backed +{x['RssFile_growth'] / gib:.2f} GiB), "
          f"{x['seconds']:.1f} s | - | <= 1 GB |" for r, x in enumerate(ranks)],
    ])
    fill = packing_fill()
    summary = (f"one core: pipeline / raw tokenizer = {ratio:.2f}\n"
               f"{cores} cores: {speedup:.2f}x one core (raw tokenizer's ceiling {ceiling_x:.2f}x)\n"
               f"cached rerun start-up = {rerun['seconds'] / first['seconds']:.1%} of the first\n"
               f"its checks = {rerun['verify_s'] / rerun['seconds']:.1%} of it ({rerun['verify_s']:.2f} s)\n"
               + "\n".join(f"rank {r}: private memory +{x['RssAnon_growth'] / gib:.2f} GiB" for r, x in enumerate(ranks)))
    details = (f"data: {args.rows:,} generated Alpaca rows (~{first['tokens'] // max(1, first['samples'])} tokens "
               f"each; {args.ratio_rows:,} for the one-core and cores rows), template alpaca, max_seq_len 2048; "
               f"tokenizer: the repo's llama2 SentencePiece BPE, vocab {args.vocab:,}")
    report("data_pipeline", command, details, table + "\n\n" + "\n".join(fill), summary, args.record)


if __name__ == "__main__":
    main()
