"""The tokenized-data cache (issue 18, scope 1 and 2; distft/data/cache.py): one byte of data, the
tokenizer or a token-changing setting is a new key; the cached samples are exactly the ones
prepare_data builds; one rank builds while another waits (real processes); a killed build leaves
no half cache and the next build recovers; a damaged cache is set aside and rebuilt.

The tests that start a process: tests/cli/test_data_cache.py."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from distft.config import DataConfig
from distft.data.cache import prepared
from distft.data.pipeline import DataError, prepare_data
from distft.data.samples import TokenSamples
from distft.model.build import build_offline_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} " * (1 + i % 5)} for i in range(start, start + n)]


def write_jsonl(path, data) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def cfg_for(path: str, cache_dir, **kw) -> DataConfig:
    return DataConfig(**{"source": "jsonl", "path": path, "template": "alpaca_short", "max_seq_len": 64,
                         "cache_dir": str(cache_dir), **kw})


def same(a, b) -> bool:
    return (list(a.train) == list(b.train) and list(a.eval) == list(b.eval) and a.eval_rows == b.eval_rows
            and a.report.as_dict() == b.report.as_dict() and list(a.stop_ids) == list(b.stop_ids))


def test_the_cache_holds_exactly_what_prepare_data_builds_and_is_found_again(tmp_path):
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(200) + rows(1)), tmp_path / "cache")
    direct = prepare_data(cfg, tok)
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert first.built and first.path.startswith(str(tmp_path / "cache"))
    assert same(first.data, direct) and direct.report.duplicate == 1
    assert isinstance(first.data.train.tokens, np.memmap)  # trained from the memory map, not the lists built
    again = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert not again.built and again.path == first.path and same(again.data, direct)
    # order and batching settings are not in the key: the same cache, the report's packing redone
    unpacked = prepared(cfg_for(cfg.path, tmp_path / "cache", packing=False, shuffle=False), tok, 0, str(tmp_path), prepare_data)
    assert unpacked.path == first.path and not unpacked.built
    assert unpacked.data.report.train_sequences == len(direct.train) and unpacked.data.report.packing_fill is None
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first.path)]  # no lock, no tmp left


def test_one_changed_byte_a_setting_or_another_tokenizer_is_a_new_cache(tmp_path):
    from distft.config import ModelConfig
    from distft.data.tokenizers import save_tokenizer
    from distft.model.build import load_tokenizer

    tok = build_offline_tokenizer()
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows(100))
    cfg = cfg_for(str(path), tmp_path / "cache")
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    text = path.read_text()
    path.write_text(text.replace("Repeat 7.", "Repeat 8.", 1))  # one byte
    changed = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert changed.built and changed.path != first.path
    assert list(changed.data.train) + list(changed.data.eval) != list(first.data.train) + list(first.data.eval)
    path.write_text(text)  # back: the first cache again
    assert prepared(cfg, tok, 0, str(tmp_path), prepare_data).path == first.path
    longer = prepared(cfg_for(str(path), tmp_path / "cache", max_seq_len=80), tok, 0, str(tmp_path), prepare_data)
    assert longer.built and longer.path != first.path
    llama2 = load_tokenizer(ModelConfig(tokenizer=str(save_tokenizer("llama2", tmp_path / "tok"))))
    other = prepared(cfg, llama2, 0, str(tmp_path), prepare_data)
    assert other.built and other.path != first.path and same(other.data, prepare_data(cfg, llama2))
    assert len(os.listdir(tmp_path / "cache")) == 4


def test_a_damaged_cache_is_set_aside_and_rebuilt(tmp_path, caplog):
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(200)), tmp_path / "cache")
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    tokens = os.path.join(first.path, "train.tokens.npy")
    with open(tokens, "r+b") as f:
        f.truncate(os.path.getsize(tokens) - 8)
    with caplog.at_level("WARNING", logger="distft"):
        again = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert again.built and same(again.data, prepare_data(cfg, tok))
    assert any("is damaged (train.tokens.npy is" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    aside = [n for n in os.listdir(tmp_path / "cache") if ".damaged-" in n]
    assert len(aside) == 1  # kept, not deleted: it is the user's disk to clean


def test_a_waiting_rank_gives_up_with_a_message(tmp_path, monkeypatch):
    import distft.data.cache as datacache
    from distft.runlock import try_take

    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(50)), tmp_path / "cache", cache_wait_s=1)
    # No builder anywhere (rank 0 on another node with a node-local cache_dir): a clear message.
    monkeypatch.setattr(datacache, "NO_BUILDER_S", 0.5)
    with pytest.raises(DataError, match=r"rank 1 on .* has seen no data cache at .* must be a directory every rank sees"):
        prepared(cfg, tok, 0, str(tmp_path), prepare_data, rank=1)
    # A live builder that takes too long: rank 0 of another job waits data.cache_wait_s, then says so.
    key = os.path.basename(prepared(cfg_for(cfg.path, tmp_path / "probe"), tok, 0, str(tmp_path), prepare_data).path)
    lock, _ = try_take(str(tmp_path / "cache" / f"{key}.lock"), "test")
    try:
        with pytest.raises(DataError, match=r"waited \d+ s for pid \d+ on .* to build the data cache .*data.cache_wait_s=1"):
            prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    finally:
        lock.release()


def test_token_samples_round_trip_and_refuse_labels_that_are_not_their_tokens(tmp_path):
    samples = TokenSamples.from_samples([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [9], "labels": [-100]}])
    samples.save(str(tmp_path), "x")
    loaded = TokenSamples.load(str(tmp_path), "x")
    assert loaded == samples and loaded[0] == {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    assert list(loaded.lengths) == [3, 1] and loaded.token_count == 4 and loaded.target_count == 2
    with pytest.raises(ValueError, match="each be its token or -100"):
        TokenSamples.from_samples([{"input_ids": [5, 6], "labels": [-100, 7]}])


# ------------------------------------------------ verified, not just sized (issue 34, items 5 and 6)


def same_length_rows(n: int) -> list[dict]:
    """Rows of one length (the offline tokenizer is character-level): with eval_size=n/2 the train
    and eval arrays have the same sizes, so only their content tells them apart."""
    return [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}"} for i in range(100, 100 + n)]


def damaged_dirs(cache) -> list[str]:
    return [n for n in os.listdir(cache) if ".damaged-" in n]


def rebuilt_after(cfg, tok, tmp_path, caplog) -> tuple:
    """prepared() again: (its result, the one warning it logged)."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="distft"):
        again = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    return again, warnings[0]


def reverse_tokens(path):
    tokens = np.load(os.path.join(path, "train.tokens.npy"), mmap_mode="r+")
    tokens[:] = tokens[::-1].copy()
    tokens.flush()


def invert_targets(path):
    targets = np.load(os.path.join(path, "train.targets.npy"), mmap_mode="r+")
    targets[:] = 1 - targets
    targets.flush()


def swap_train_and_eval(path):
    for array in ("tokens", "targets", "offsets"):
        train, held_out = os.path.join(path, f"train.{array}.npy"), os.path.join(path, f"eval.{array}.npy")
        os.rename(train, train + ".swap")
        os.rename(held_out, train)
        os.rename(train + ".swap", held_out)


@pytest.mark.parametrize("damage", [reverse_tokens, invert_targets, swap_train_and_eval])
def test_changed_content_of_the_right_size_is_caught_by_its_checksum_and_rebuilt(tmp_path, caplog, damage):
    """Reversed tokens, inverted targets, train and eval swapped: every file keeps its size (and
    the manifest its counts), so only the checksums see it. The cache is moved aside with a
    warning naming the file, and the rebuilt one holds what a fresh build holds."""
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", same_length_rows(40)), tmp_path / "cache", eval_size=20)
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert len(first.data.train) == len(first.data.eval) == 20
    assert first.data.train.token_count == first.data.eval.token_count  # a swap keeps every size
    damage(first.path)
    again, warning = rebuilt_after(cfg, tok, tmp_path, caplog)
    assert again.built and again.path == first.path and same(again.data, prepare_data(cfg, tok))
    file = "train.targets.npy" if damage is invert_targets else "train.tokens.npy"
    assert warning.startswith(f"data cache {first.path} is damaged ({file} does not match its checksum")
    (aside,) = damaged_dirs(tmp_path / "cache")
    assert f"moved to {tmp_path / 'cache' / aside} and rebuilt" in warning
    kept = np.load(tmp_path / "cache" / aside / file)  # the damaged cache is kept as it was found
    assert not np.array_equal(kept, getattr(again.data.train, file.split(".")[1]))


def forge(path, file, change) -> None:
    """Change `file`'s array in place and write its new checksum into the manifest, as whoever can
    write the cache can: only the content checks can tell."""
    from distft.data.samples import CHECKSUM, checksum

    array = np.load(os.path.join(path, file), mmap_mode="r+")
    change(array)
    array.flush()
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    manifest["files"][file][CHECKSUM] = checksum(np.load(os.path.join(path, file), mmap_mode="r"))
    open(os.path.join(path, "manifest.json"), "w").write(json.dumps(manifest))


@pytest.mark.parametrize("case", ["past the vocabulary", "negative", "target flag 2", "prompt id",
                                  "prompt offsets"])
def test_ids_outside_the_tokenizers_vocabulary_are_a_damaged_cache_not_an_index_error(tmp_path, caplog, case):
    """Ids the checksums cannot catch (the manifest rewritten with them): each load checks every
    token id against len(tokenizer), every target flag is 0 or 1, the eval rows' prompt ids and
    their offsets: the cache is moved aside and rebuilt instead of an IndexError in the embedding
    steps later."""
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(60)), tmp_path / "cache")
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    vocab = len(tok)
    if case == "past the vocabulary":
        forge(first.path, "train.tokens.npy", lambda a: a.__setitem__(7, vocab + 5))
        said = f"train.tokens.npy: token id {vocab + 5} is outside the tokenizer's vocabulary of {vocab} ids"
    elif case == "negative":
        forge(first.path, "eval.tokens.npy", lambda a: a.__setitem__(3, -7))
        said = f"eval.tokens.npy: token id -7 is outside the tokenizer's vocabulary of {vocab} ids"
    elif case == "target flag 2":
        forge(first.path, "train.targets.npy", lambda a: a.__setitem__(5, 2))
        said = "train.targets.npy: a target flag is 2: each must be 0 (label -100) or 1 (label = the token)"
    elif case == "prompt id":
        forge(first.path, "eval_rows.prompt_ids.npy", lambda a: a.__setitem__(0, vocab))
        said = f"eval_rows.prompt_ids.npy: prompt id {vocab} is outside the tokenizer's vocabulary of {vocab} ids"
    else:
        forge(first.path, "eval_rows.prompt_offsets.npy", lambda a: a.__setitem__(1, a[2] + 1))
        said = "eval_rows.prompt_offsets.npy does not cut eval_rows.prompt_ids.npy into prompts"
    again, warning = rebuilt_after(cfg, tok, tmp_path, caplog)
    assert f"is damaged ({said}" in warning
    assert again.built and same(again.data, prepare_data(cfg, tok)) and len(damaged_dirs(tmp_path / "cache")) == 1
    assert int(again.data.train.tokens.max()) < vocab and int(again.data.eval.tokens.min()) >= 0


def test_a_symlinked_key_directory_is_moved_aside_not_followed_and_rebuilt(tmp_path, caplog):
    """`<cache>/<key>` a link to a sound cache elsewhere (here: the real one, moved): refused
    whatever it holds; the link itself is moved aside, its target left as it was, and a real
    directory built in its place."""
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(60)), tmp_path / "cache")
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    elsewhere = tmp_path / "elsewhere"
    os.rename(first.path, elsewhere)
    os.symlink(elsewhere, first.path)
    before = {n: (elsewhere / n).read_bytes() for n in os.listdir(elsewhere)}
    again, warning = rebuilt_after(cfg, tok, tmp_path, caplog)
    assert warning.startswith(f"data cache {first.path} is damaged (it is a symbolic link (to {elsewhere}): a cache is "
                              "never read through a link)")
    assert again.built and same(again.data, prepare_data(cfg, tok))
    assert os.path.isdir(first.path) and not os.path.islink(first.path)
    (aside,) = damaged_dirs(tmp_path / "cache")
    assert os.readlink(tmp_path / "cache" / aside) == str(elsewhere)  # the link moved, not its target
    assert {n: (elsewhere / n).read_bytes() for n in os.listdir(elsewhere)} == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("file,planted", [("manifest.json", "fifo"), ("manifest.json", "/dev/zero"),
                                          ("train.tokens.npy", "fifo"), ("train.tokens.npy", "/dev/zero"),
                                          ("eval_rows.json", "fifo"), ("train.tokens.npy", "a link to a copy")])
def test_a_fifo_or_a_link_in_the_cache_is_refused_without_blocking(tmp_path, caplog, file, planted):
    """A FIFO would block its reader for ever, a link to /dev/zero never ends, a link to a sound
    copy of the file is still a link: each is named in the warning, moved aside with its cache,
    and the cache rebuilt (within the test's timeout: nothing blocked)."""
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(60)), tmp_path / "cache")
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    target = os.path.join(first.path, file)
    copy = tmp_path / "copy"
    os.rename(target, copy)
    if planted == "fifo":
        os.mkfifo(target)
        said = f"{file} is a named pipe (FIFO), not a regular file"
    else:
        os.symlink(copy if planted == "a link to a copy" else planted, target)
        said = f"{file} is a symbolic link (to {copy if planted == 'a link to a copy' else planted}), not a regular file"
    again, warning = rebuilt_after(cfg, tok, tmp_path, caplog)
    assert said in warning and warning.startswith(f"data cache {first.path} is damaged (")
    assert again.built and same(again.data, prepare_data(cfg, tok))
    (aside,) = damaged_dirs(tmp_path / "cache")
    assert os.lstat(tmp_path / "cache" / aside / file).st_mode & 0o170000 in (0o010000, 0o120000)  # kept as found


@pytest.mark.parametrize("manifest,said", [
    pytest.param("{not json", "its manifest.json is not JSON", id="not JSON"),
    pytest.param("[" * 100_000 + "]" * 100_000, "its manifest.json is not JSON (manifest.json: JSON nested too deeply)",
                 id="nested"),
    pytest.param("[1, 2]", "its manifest.json is not a JSON object", id="a list"),
    pytest.param("wrong types", "its manifest.json lacks, or has the wrong type of, files.train.tokens.npy, "
                 "train_samples, stop_ids, report.train", id="wrong types"),
])
def test_a_damaged_manifest_is_moved_aside_and_rebuilt_not_a_traceback(tmp_path, caplog, manifest, said):
    """Not JSON, JSON nested deeper than the parser goes, not an object, fields of the wrong type:
    each is a damaged cache (moved aside with a warning saying what, and rebuilt), not a traceback
    on every run (a RecursionError, an AttributeError, a KeyError, a TypeError)."""
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(60)), tmp_path / "cache")
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    path = os.path.join(first.path, "manifest.json")
    if manifest == "wrong types":
        fields = json.loads(open(path).read())
        fields["files"]["train.tokens.npy"]["bytes"] = "37488"
        fields.update(train_samples=None, stop_ids=[2, "</s>"])
        fields["report"]["train"] = [1]
        manifest = json.dumps(fields)
    open(path, "w").write(manifest)
    again, warning = rebuilt_after(cfg, tok, tmp_path, caplog)
    assert warning.startswith(f"data cache {first.path} is damaged ({said}")
    assert again.built and same(again.data, prepare_data(cfg, tok)) and len(damaged_dirs(tmp_path / "cache")) == 1


@pytest.mark.parametrize("euid", [0, 1000])
def test_a_cache_directory_every_user_may_write_is_refused_for_root_and_warned_about_otherwise(
        tmp_path, caplog, monkeypatch, euid):
    """chmod 0777: root refuses it (a DataError naming the directory and the fix), anyone else is
    warned once and goes on; a group-writable one (0775) passes silently."""
    tok = build_offline_tokenizer()
    cache = tmp_path / "cache"
    cache.mkdir()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(60)), cache)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    os.chmod(cache, 0o777)
    said = (f"data cache directory {cache} is writable by every user of this machine (drwxrwxrwx): anyone could "
            f"replace the samples a run trains on; make it yours alone with `chmod o-w {cache}`")
    if euid == 0:
        with pytest.raises(DataError) as refused:
            prepared(cfg, tok, 0, str(tmp_path), prepare_data)
        assert str(refused.value).startswith(said) and "root does not train on data" in str(refused.value)
        assert os.listdir(cache) == []  # nothing built, nothing read
    else:
        with caplog.at_level("WARNING", logger="distft"):
            built = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
        assert built.built and [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
            said + ", or set data.cache_dir to a directory only you can write"]
    caplog.clear()
    os.chmod(cache, 0o775)
    with caplog.at_level("WARNING", logger="distft"):
        assert same(prepared(cfg, tok, 0, str(tmp_path), prepare_data).data, prepare_data(cfg, tok))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_build_lock_naming_a_live_process_that_holds_nothing_does_not_block(tmp_path, caplog):
    """`<key>.lock` naming pid 1 (alive, its start time right) whose heartbeat stopped an hour
    ago: taken over with a warning and built at once, where it blocked for data.cache_wait_s."""
    import dataclasses
    import socket

    from distft import runlock
    from distft.data.cache import _locate

    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(60)), tmp_path / "cache", cache_wait_s=30)
    _, key, path = _locate(cfg, tok, 0, str(tmp_path))
    os.makedirs(tmp_path / "cache")
    planted = runlock.Holder(pid=1, host=socket.gethostname(), job=None, started=time.time() - 3600,
                             pid_start=runlock._process_start(1), boot_id=runlock._boot_id())
    lock = f"{path}.lock"
    with open(lock, "w") as f:
        json.dump(dataclasses.asdict(planted), f)
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="distft"):
        result = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert time.monotonic() - started < 20 and result.built and same(result.data, prepare_data(cfg, tok))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"data cache {path}: taking over its lock, its holder ({planted.describe()}) has not refreshed it for 3600 s "
        "(it does every 30 s): pid 1 is running but does not hold it"]
    assert os.listdir(tmp_path / "cache") == [key]  # the lock released, nothing left


def test_a_link_planted_where_the_build_writes_is_removed_not_written_through(tmp_path):
    """`<key>.tmp-<host>-<pid>`, the build's own directory, planted as a link to a directory
    elsewhere: removed (the link, not its target) and the build writes into a new directory of
    its own; nothing lands in the target."""
    import socket

    from distft.data.cache import _locate

    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(60)), tmp_path / "cache")
    _, key, path = _locate(cfg, tok, 0, str(tmp_path))
    os.makedirs(tmp_path / "cache")
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", f"{path}.tmp-{socket.gethostname()}-{os.getpid()}")
    result = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert result.built and same(result.data, prepare_data(cfg, tok))
    assert os.listdir(tmp_path / "target") == [] and os.listdir(tmp_path / "cache") == [key]
    assert not os.path.islink(path) and os.path.isfile(os.path.join(path, "manifest.json"))
