"""The data pipeline: loaders, every cleaning rule with exact counts, templates, prompt masking,
packing without cross-sample attention, split, augmentation and the resumable batch order."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from distft.config import AugmentConfig, DataConfig, ModelConfig, SyntheticDataConfig
from distft.data.pipeline import (
    DataError,
    TrainBatches,
    eval_batches,
    pack,
    prepare_data,
    tokenize_row,
)
from distft.data.templates import alpaca_prompt, render_chat
from distft.model.build import IGNORE_INDEX, build_model, build_offline_tokenizer, token_loss

ROW = {"instruction": "Uppercase the word.", "input": "abc", "output": "ABC"}


@pytest.fixture(scope="module")
def tok():
    return build_offline_tokenizer()


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def alpaca_rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": "Count the letters.", "input": "x" * (i % 7 + 1) + str(i), "output": str(i)}
            for i in range(start, start + n)]


def cfg_for(path=None, **kw) -> DataConfig:
    kw.setdefault("template", "alpaca_short")
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(source=kw.pop("source", "jsonl" if path else "synthetic"), path=path, **kw)


def target_spans(tok, sample) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    spans, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans + ([tok.decode(current)] if current else [])


# ------------------------------------------------------------------------------------------------
# Loading


def test_jsonl_json_csv_parquet_hf_disk_load_the_same_rows(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = alpaca_rows(6)
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "json": str(tmp_path / "d.json"),
        "csv": str(tmp_path / "d.csv"),
        "parquet": str(tmp_path / "d.parquet"),
        "hf_disk": str(tmp_path / "d_hf"),
    }
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("instruction,input,output\n" + "".join(
        f"{r['instruction']},{r['input']},{r['output']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    Dataset.from_list(rows).save_to_disk(paths["hf_disk"])
    expected = prepare_data(cfg_for(paths["jsonl"]), tok).train
    assert len(expected) == 6
    assert target_spans(tok, expected[3]) == ["3</s>"]
    for source, path in paths.items():
        data = prepare_data(cfg_for(path, source=source), tok)
        assert data.train == expected, source
        assert data.report.loaded == data.report.kept == 6, source


def test_json_falls_back_to_json_lines_and_rejects_an_object(tmp_path, tok):
    path = write_jsonl(tmp_path / "lines.json", alpaca_rows(3))
    assert prepare_data(cfg_for(path, source="json"), tok).report.kept == 3
    (tmp_path / "obj.json").write_text(json.dumps({"rows": alpaca_rows(3)}))
    with pytest.raises(DataError, match="not a list of rows"):
        prepare_data(cfg_for(str(tmp_path / "obj.json"), source="json"), tok)
    (tmp_path / "broken.json").write_text(json.dumps(alpaca_rows(3), indent=1)[:-3])
    with pytest.raises(DataError, match="is not valid JSON"):
        prepare_data(cfg_for(str(tmp_path / "broken.json"), source="json"), tok)


def test_unknown_synthetic_task_is_a_data_error(tok):
    with pytest.raises(DataError, match="data.synthetic.tasks.*allowed: uppercase"):
        prepare_data(DataConfig(synthetic=SyntheticDataConfig(tasks=["add", "divide"])), tok)


def test_hf_disk_validation_split_becomes_eval(tmp_path, tok):
    from datasets import Dataset, DatasetDict

    splits = {"train": alpaca_rows(8), "validation": alpaca_rows(3, start=50)}
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(tmp_path / "dd"))
    data = prepare_data(cfg_for(str(tmp_path / "dd"), source="hf_disk", eval_fraction=0.5), tok)
    assert (data.report.train, data.report.eval) == (8, 3)  # eval_fraction ignored: the split exists
    assert [r["reference"] for r in data.eval_rows] == ["50", "51", "52"]


def test_missing_path_names_the_key_the_path_and_the_fix(tmp_path, tok):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as err:
        prepare_data(cfg_for(missing), tok)
    message = str(err.value)
    assert "data.path" in message and missing in message and "set data.path" in message
    with pytest.raises(DataError, match="data.path is not set"):
        prepare_data(DataConfig(source="csv", path=None), tok)
    with pytest.raises(DataError, match="data.eval_path"):
        prepare_data(cfg_for(write_jsonl(tmp_path / "t.jsonl", alpaca_rows(3)), eval_path=missing), tok)


# ------------------------------------------------------------------------------------------------
# Cleaning


def test_every_cleaning_rule_is_counted_exactly(tmp_path, tok):
    good = alpaca_rows(4)
    lines = [
        *good,                                                             # 4 kept
        '{"instruction": "broken", ',                                      # malformed: bad JSON
        "[1, 2, 3]",                                                       # malformed: not an object
        {"instruction": "Add.", "input": "1 + 1", "output": 2},            # malformed: output is a number
        {"instruction": "Add.", "output": ["2"]},                          # malformed: output is a list
        {"messages": "hello"},                                             # malformed: messages not a list
        {"messages": [{"role": "user"}]},                                  # malformed: no content
        {"question": "q", "answer": "a"},                                  # malformed: no known field
        {"instruction": "   ", "output": "x"},                             # empty instruction
        {"instruction": "Say.", "output": " "},                            # empty output
        {"text": "\n"},                                                    # empty text
        {"messages": [{"role": "user", "content": "hi"}]},                 # empty: no assistant turn
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},  # empty
        {**good[1], "instruction": "  Count   the letters. "},              # duplicate (normalised)
        good[2],                                                           # duplicate (exact)
        {"instruction": "Echo.", "input": "y" * 300, "output": "y"},       # overlong
        {"text": "free text row"},                                         # kept (text)
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},  # kept
    ]
    report = prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", lines), max_seq_len=128), tok).report
    rules = ("loaded", "malformed", "empty", "duplicate", "overlong", "truncated", "kept")
    counts = {k: getattr(report, k) for k in rules}
    assert counts == dict(loaded=21, malformed=7, empty=5, duplicate=2, overlong=1, truncated=0, kept=6)
    assert report.train == 6 and report.eval == 0
    assert "malformed 7" in report.summary() and report.as_dict()["duplicate"] == 2


def test_truncate_instead_of_drop(tmp_path, tok):
    rows = [{"instruction": "Echo.", "input": "y", "output": "z" * 200}, *alpaca_rows(2),
            {"instruction": "P" * 120, "output": "z"}]  # prompt alone too long: still dropped
    data = prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), max_seq_len=100, drop_overlong=False), tok)
    assert (data.report.truncated, data.report.overlong, data.report.kept) == (1, 1, 3)
    assert len(data.train[0]["input_ids"]) == len(data.train[0]["labels"]) == 100
    assert data.train[0]["labels"][-1] == data.train[0]["input_ids"][-1] != tok.eos_token_id  # cut, no eos
    assert max(len(s["input_ids"]) for s in data.train[1:]) < 100


def test_on_bad_rows_fail_names_rule_row_line_and_fix(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [*alpaca_rows(2), "not json", *alpaca_rows(1)])
    with pytest.raises(DataError) as err:
        prepare_data(cfg_for(path, on_bad_rows="fail"), tok)
    message = str(err.value)
    assert "row 2 (line 3)" in message and "malformed" in message and "invalid JSON" in message
    assert "data.on_bad_rows=drop" in message
    path = write_jsonl(tmp_path / "e.jsonl", [*alpaca_rows(2), alpaca_rows(1)[0]])
    with pytest.raises(DataError, match=r"row 2 \(line 3\) .* is duplicate"):
        prepare_data(cfg_for(path, on_bad_rows="fail"), tok)
    path = write_jsonl(tmp_path / "f.jsonl", [{"instruction": "Echo.", "output": "z" * 300}])
    with pytest.raises(DataError, match="overlong: .*data.max_seq_len=256"):
        prepare_data(cfg_for(path, on_bad_rows="fail"), tok)


def test_nothing_left_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="no training rows left.*malformed 2"):
        prepare_data(cfg_for(write_jsonl(tmp_path / "d.jsonl", ["{", "[]"])), tok)


def test_custom_field_names_and_explicit_format(tmp_path, tok):
    rows = [{"q": "Add.", "ctx": "1 + 2", "a": "3"}, {"q": "Add.", "a": "4", "text": "ignored"}]
    cfg = cfg_for(write_jsonl(tmp_path / "d.jsonl", rows), format="alpaca",
                  instruction_field="q", input_field="ctx", output_field="a")
    data = prepare_data(cfg, tok)
    assert [target_spans(tok, s) for s in data.train] == [["3</s>"], ["4</s>"]]
    assert tok.decode(data.train[0]["input_ids"]).startswith("<s>### Instruction:\nAdd.\n\n### Input:\n1 + 2\n\n")
    data = prepare_data(cfg_for(write_jsonl(tmp_path / "t.jsonl", rows), format="text"), tok)
    assert (data.report.malformed, data.report.kept) == (1, 1)  # only one row has a text field


# ------------------------------------------------------------------------------------------------
# Templates and masking


def test_alpaca_templates_exact_strings():
    assert alpaca_prompt(ROW, "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nUppercase the word.\n\n### Input:\nabc\n\n### Response:\n"
    )
    no_input = {**ROW, "input": ""}
    assert alpaca_prompt(no_input, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nUppercase the word.\n\n### Response:\n"
    )
    short = "### Instruction:\nUppercase the word.\n\n### Input:\nabc\n\n### Response:\n"
    assert alpaca_prompt(ROW, "alpaca_short") == short
    assert alpaca_prompt(no_input, "alpaca_short") == "### Instruction:\nUppercase the word.\n\n### Response:\n"
    assert alpaca_prompt(ROW, "plain") == "Uppercase the word.\nabc\n"
    assert alpaca_prompt(no_input, "plain") == "Uppercase the word.\n"


@pytest.mark.parametrize("template", ["alpaca", "alpaca_short", "plain"])
def test_labels_are_exactly_response_and_eos(tok, template):
    cfg = DataConfig(template=template)
    sample = tokenize_row(dict(ROW), "alpaca", cfg, tok)
    prompt = alpaca_prompt(ROW, template)
    expected_ids = [tok.bos_token_id] + tok.encode(prompt + "ABC", add_special_tokens=False) + [tok.eos_token_id]
    assert sample["input_ids"] == expected_ids
    n_prompt = 1 + len(prompt)  # char-level: one token per character, plus bos
    assert sample["labels"] == [IGNORE_INDEX] * n_prompt + expected_ids[n_prompt:]
    assert target_spans(tok, sample) == ["ABC</s>"]
    on_prompt = tokenize_row(dict(ROW), "alpaca", DataConfig(template=template, train_on_prompt=True), tok)
    assert on_prompt["labels"] == [IGNORE_INDEX] + expected_ids[1:]  # first token never a target


def test_chat_template_and_only_assistant_turns_are_targets(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    sample = tokenize_row({"messages": messages}, "chat", DataConfig(), tok)
    assert tok.decode(sample["input_ids"]) == (
        "<s>### system:\nBe brief.\n### user:\nhi\n### assistant:\nhello</s>\n### user:\n2+2?\n### assistant:\n4</s>\n"
    )
    # Each answer and its end-of-turn token; the newline the template writes after eos is the next prompt's.
    assert target_spans(tok, sample) == ["hello</s>", "4</s>"]
    # An alpaca row under template=chat becomes [user, assistant]; eval prompt is the generation prompt.
    row_sample = tokenize_row(dict(ROW), "alpaca", DataConfig(template="chat"), tok)
    assert tok.decode(row_sample["input_ids"]) == "<s>### user:\nUppercase the word.\n\nabc\n### assistant:\nABC</s>\n"
    assert target_spans(tok, row_sample) == ["ABC</s>"]


def test_without_bos_the_first_token_is_still_never_a_target():
    tok = build_offline_tokenizer()
    tok.backend_tokenizer.post_processor = None  # a tokenizer that adds no bos (ChatML models: SmolLM2, Qwen)
    text = tokenize_row({"text": "hello"}, "text", DataConfig(), tok)
    assert text["input_ids"] == tok.encode("hello") + [tok.eos_token_id]
    assert text["labels"] == [IGNORE_INDEX] + text["input_ids"][1:]
    prompted = tokenize_row(dict(ROW), "alpaca", DataConfig(template="plain", train_on_prompt=True), tok)
    assert prompted["input_ids"][0] == tok.encode("U")[0] and prompted["labels"][0] == IGNORE_INDEX


def test_conversation_the_chat_template_rejects_is_malformed(tmp_path):
    tok = build_offline_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
        + tok.chat_template
    )
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "c"}]}
    report = prepare_data(cfg_for(write_jsonl(tmp_path / "c.jsonl", [good, bad])), tok).report
    assert (report.kept, report.malformed) == (1, 1)
    with pytest.raises(DataError, match="row 1 .* malformed: .*must start with user"):
        prepare_data(cfg_for(write_jsonl(tmp_path / "c.jsonl", [good, bad]), on_bad_rows="fail"), tok)


def test_chat_template_that_is_not_prefix_stable_is_rejected(tmp_path):
    tok = build_offline_tokenizer()
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(Exception, match="not prefix-stable") as err:
        render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tok)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="prefix-stable"):
        prepare_data(cfg_for(path), tok)
    assert err.type.__name__ == "TemplateError"


def test_eval_rows_are_the_exact_prompt_and_reference(tmp_path, tok):
    rows = [*alpaca_rows(3), {"text": "just text"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "task": "x"}]
    train_path = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(4, start=10))
    data = prepare_data(cfg_for(train_path, eval_path=write_jsonl(tmp_path / "e.jsonl", rows)), tok)
    assert data.report.eval == len(data.eval) == 5
    assert [{k: v for k, v in r.items() if k != "prompt_ids"} for r in data.eval_rows] == [  # text rows: no prompt
        *({"prompt": alpaca_prompt(r, "alpaca_short"), "reference": r["output"]} for r in rows[:3]),
        {"prompt": "### user:\nhi\n### assistant:\n", "reference": "yo", "task": "x"},
    ]
    samples = list(data.eval)
    samples.pop(3)  # line the samples up with eval_rows
    # The prompt ids are exactly the unmasked prefix of the eval sample, and the prompt's text.
    for row, sample in zip(data.eval_rows, samples):
        n = len(row["prompt_ids"])
        assert row["prompt_ids"] == sample["input_ids"][:n] == [1] + tok.encode(row["prompt"], add_special_tokens=False)
        assert sample["labels"][:n] == [IGNORE_INDEX] * n and sample["labels"][n] != IGNORE_INDEX


# ------------------------------------------------------------------------------------------------
# Split and augmentation


def syn_cfg(**kw) -> DataConfig:
    kw.setdefault("synthetic", SyntheticDataConfig(num_examples=200, seed=5))
    kw.setdefault("template", "alpaca_short")
    return DataConfig(**kw)


def test_split_is_deterministic_and_sized(tok):
    a = prepare_data(syn_cfg(eval_fraction=0.1), tok)
    b = prepare_data(syn_cfg(eval_fraction=0.1), tok)
    assert (a.report.train, a.report.eval) == (180, 20)
    assert a.train == b.train and a.eval == b.eval and a.eval_rows == b.eval_rows
    assert {r["task"] for r in a.eval_rows} <= {"uppercase", "reverse", "add", "repeat", "sort_letters", "count"}
    train_ids = {tuple(s["input_ids"]) for s in a.train}
    assert not any(tuple(s["input_ids"]) in train_ids for s in a.eval)  # disjoint
    c = prepare_data(syn_cfg(eval_fraction=0.1, seed=1), tok)
    assert c.eval != a.eval and len(c.eval) == 20  # data.seed chooses the held-out rows
    d = prepare_data(syn_cfg(eval_fraction=0.1, eval_size=7), tok)
    assert (d.report.train, d.report.eval, len(d.eval_rows)) == (193, 7, 7)  # eval_size wins
    with pytest.raises(DataError, match="data.eval_size=200 .* none to train"):
        prepare_data(syn_cfg(eval_size=200), tok)


def test_eval_path_is_cleaned_and_deduplicated_against_train(tmp_path, tok):
    train = alpaca_rows(10)
    held = [*alpaca_rows(3, start=100), train[0], "{bad"]
    cfg = cfg_for(write_jsonl(tmp_path / "t.jsonl", train), eval_path=write_jsonl(tmp_path / "e.jsonl", held),
                  eval_fraction=0.5)
    report = prepare_data(cfg, tok).report
    assert (report.train, report.eval, report.duplicate, report.malformed, report.loaded) == (10, 3, 1, 1, 15)


def add_suffix(row: dict, rng: random.Random, suffix: str = "!") -> dict:
    row["output"] += suffix
    return row


def add_paraphrase(row: dict, rng: random.Random) -> list[dict]:
    return [row, {**row, "instruction": row["instruction"] + " Please."}]


def drop_odd(row: dict, rng: random.Random):
    return None if int(row["output"]) % 2 else row


def test_augmentation_functions_apply_to_train_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20))
    base = dict(eval_size=5)
    plain = prepare_data(cfg_for(path, **base), tok)

    fn = {"_target_": "tests.unit.test_data.add_suffix", "suffix": "?!"}
    data = prepare_data(cfg_for(path, **base, augment=AugmentConfig(functions=[fn])), tok)
    assert (data.report.train, data.report.augmented, data.report.eval) == (15, 15, 5)
    assert all(target_spans(tok, s)[0].endswith("?!</s>") for s in data.train)
    assert data.eval == plain.eval and data.eval_rows == plain.eval_rows  # eval never augmented
    assert not any("?!" in r["reference"] for r in data.eval_rows)

    paraphrase = AugmentConfig(functions=["tests.unit.test_data.add_paraphrase"])  # a bare target string
    data = prepare_data(cfg_for(path, **base, augment=paraphrase), tok)
    assert (data.report.train, data.report.augmented) == (30, 15)
    assert sum("Please." in tok.decode(s["input_ids"]) for s in data.train) == 15

    def outputs(samples):
        return [int(target_spans(tok, s)[0][: -len("</s>")]) for s in samples]

    data = prepare_data(cfg_for(path, **base, augment=AugmentConfig(functions=["tests.unit.test_data.drop_odd"])), tok)
    odd = sum(o % 2 for o in outputs(plain.train))
    assert 0 < odd < 15 and (data.report.augment_dropped, data.report.train, data.report.augmented) == (odd, 15 - odd, 0)
    assert outputs(data.train) == [o for o in outputs(plain.train) if o % 2 == 0]


def test_bad_augmentation_target_names_the_key(tok):
    cfg = syn_cfg(augment=AugmentConfig(functions=[{"_target_": "tests.unit.test_data.no_such_fn"}]))
    with pytest.raises(DataError, match=r"data\.augment\.functions.*tests\.unit\.test_data\.no_such_fn"):
        prepare_data(cfg, tok)
    with pytest.raises(DataError, match=r"data\.augment\.functions.*nope\.module\.fn"):
        prepare_data(syn_cfg(augment=AugmentConfig(functions=[{"_target_": "nope.module.fn"}])), tok)


def test_template_variation_counts_and_determinism(tok):
    cfg = syn_cfg(eval_size=20, augment=AugmentConfig(template_variation=0.5))
    data = prepare_data(cfg, tok, seed=3)
    varied = [s for s in data.train if "### Response:" not in tok.decode(s["input_ids"])]
    assert data.report.augmented == len(varied) and 50 < len(varied) < 130  # p=0.5 of 180
    assert data.report.train == 180
    assert all("### Response:" in r["prompt"] for r in data.eval_rows)
    assert all("### Response:" in tok.decode(s["input_ids"]) for s in data.eval)
    assert prepare_data(cfg, tok, seed=3).train == data.train
    assert prepare_data(cfg, tok, seed=4).train != data.train  # the training seed changes the draws
    assert prepare_data(cfg, tok, seed=4).eval == data.eval  # but never the eval split


# ------------------------------------------------------------------------------------------------
# Packing: no attention or position leaks across samples


def test_pack_layout():
    samples = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]},
               {"input_ids": [1, 8, 9, 10], "labels": [-100, -100, 9, 10]}]
    rows = pack(samples, max_seq_len=7, pad_id=3, strategy="in_order")
    assert rows == [
        {"input_ids": [1, 5, 6, 1, 7, 3, 3], "labels": [-100, 5, 6, -100, 7, -100, -100],
         "position_ids": [0, 1, 2, 0, 1, 0, 1]},
        {"input_ids": [1, 8, 9, 10, 3, 3, 3], "labels": [-100, -100, 9, 10, -100, -100, -100],
         "position_ids": [0, 1, 2, 3, 0, 1, 2]},
    ]


def test_best_fit_packing_fills_rows_where_in_order_leaves_gaps():
    """Best-fit decreasing: 6+1 and 4+3 fill both rows of 7; in order, 4 | 6 | 3+1 needs three."""
    samples = [{"input_ids": [n] * n, "labels": [n] * n} for n in (4, 6, 3, 1)]
    rows = pack(samples, max_seq_len=7, pad_id=0, strategy="best_fit")
    assert [r["input_ids"] for r in rows] == [[6] * 6 + [1], [4] * 4 + [3] * 3]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 0, 1, 2]]
    assert len(pack(samples, max_seq_len=7, pad_id=0, strategy="in_order")) == 3


def test_best_fit_packing_of_the_shipped_data_is_at_least_99_percent_tokens(tok):
    """Every sample lands in exactly one row, whole; rows are full length; >= 99% of the tokens
    are not padding (in order: 92%). The data report states the fill."""
    cfg = DataConfig(template="plain", synthetic=SyntheticDataConfig(num_examples=2000))  # conf/data/synthetic.yaml
    data = prepare_data(cfg, tok)
    assert data.report.packing_fill >= 0.99 and f"packed {data.report.packing_fill:.1%} non-pad" in data.report.summary()
    rows = pack(data.train, cfg.max_seq_len, tok.pad_token_id, "best_fit")
    assert all(len(r["input_ids"]) == cfg.max_seq_len for r in rows)
    pieces = []
    for row in rows:  # cut each row at its position resets: the samples it holds, then its padding
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [cfg.max_seq_len]
        pieces += [tuple(row["input_ids"][a:b]) for a, b in zip(starts, starts[1:])]
    samples = sorted(tuple(s["input_ids"]) for s in data.train)
    padding = [p for p in pieces if set(p) == {tok.pad_token_id}]
    assert sorted(p for p in pieces if set(p) != {tok.pad_token_id}) == samples
    assert sum(map(len, padding)) / (len(rows) * cfg.max_seq_len) <= 0.01
    in_order = pack(data.train, cfg.max_seq_len, tok.pad_token_id, "in_order")
    tokens = sum(len(s["input_ids"]) for s in data.train)
    assert len(in_order) > len(rows) and tokens / (len(in_order) * cfg.max_seq_len) < 0.95


def _per_sample_losses(model, batch, spans) -> list[float]:
    """Summed token losses of each (row, start, end) span of a batch."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                             ignore_index=IGNORE_INDEX)  # losses[:, t] is the loss of token t + 1
    return [float(losses[row, start:end - 1].sum()) for row, start, end in spans]


def test_packed_samples_do_not_see_each_other(tok):
    model = build_model(ModelConfig()).eval()
    rows = [ROW, {"instruction": "Add the numbers.", "input": "12 + 30", "output": "42"},
            {"instruction": "Reverse the word.", "input": "abcde", "output": "edcba"}]
    samples = [tokenize_row(dict(r), "alpaca", DataConfig(template="alpaca_short"), tok) for r in rows]
    alone = []
    for s in samples:
        ids, labels = torch.tensor([s["input_ids"]]), torch.tensor([s["labels"]])
        with torch.no_grad():
            alone.append(float(token_loss(model(input_ids=ids, use_cache=False).logits, labels)[0]))
    lengths = [len(s["input_ids"]) for s in samples]
    max_seq_len = sum(lengths) + 9
    batch = eval_batches(samples, batch_size=4, max_seq_len=max_seq_len, packing=True, pad_id=tok.pad_token_id,
                         pack_strategy="in_order")  # the spans below are laid out in order
    assert len(batch) == 1 and set(batch[0]) == {"input_ids", "labels", "position_ids"}
    assert batch[0]["input_ids"].shape == (1, max_seq_len) and batch[0]["input_ids"].dtype == torch.long
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    spans = [(0, a, a + n) for a, n in zip(starts, lengths)]
    packed = _per_sample_losses(model, batch[0], spans)
    assert packed == pytest.approx(alone, abs=1e-4)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch[0].items() if k != "labels"}, use_cache=False).logits
    assert float(token_loss(logits, batch[0]["labels"])[0]) == pytest.approx(sum(alone), abs=1e-3)
    # The same check catches leakage: continuous positions make later samples attend to earlier ones.
    leaky = dict(batch[0], position_ids=torch.arange(max_seq_len).unsqueeze(0))
    leaked = _per_sample_losses(model, leaky, spans)
    assert leaked[0] == pytest.approx(alone[0], abs=1e-4)  # the first sample has nothing before it
    assert max(abs(a - b) for a, b in zip(leaked[1:], alone[1:])) > 1e-2


def test_padded_batches_match_samples_alone(tok):
    model = build_model(ModelConfig()).eval()
    samples = [tokenize_row(dict(r), "alpaca", DataConfig(template="plain"), tok) for r in alpaca_rows(3)]
    batches = eval_batches(samples, batch_size=2, max_seq_len=64, packing=False, pad_id=tok.pad_token_id)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    assert set(first) == {"input_ids", "labels", "attention_mask"}
    assert first["attention_mask"].tolist()[0] == [1] * len(samples[0]["input_ids"]) + [0] * (
        first["input_ids"].shape[1] - len(samples[0]["input_ids"]))
    width = first["input_ids"].shape[1]
    padded = _per_sample_losses(model, first, [(0, 0, width), (1, 0, width)])
    for s, loss in zip(samples[:2], padded):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits
        assert loss == pytest.approx(float(token_loss(logits, torch.tensor([s["labels"]]))[0]), abs=1e-4)


# ------------------------------------------------------------------------------------------------
# TrainBatches: deterministic, resumable, sharded


@pytest.fixture(scope="module")
def samples(tok):
    return prepare_data(syn_cfg(synthetic=SyntheticDataConfig(num_examples=120, seed=2), eval_fraction=0.0), tok).train


def _rows(batch) -> list[tuple]:
    return [tuple(r) for r in batch["input_ids"].tolist()]


def test_train_batches_position_reshards_between_rank_counts(samples):
    """The data position is saved in rows, so a run saved on 2 ranks resumes on 1 (and back) with
    the same rows in each optimizer step: 2 ranks x micro 2 == 1 rank x micro 2 x 2 accumulations."""
    two = [TrainBatches(samples, 2, 128, False, pad_id=3, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        for ranks in two:
            next(ranks)
    one = TrainBatches(samples, 2, 128, False, pad_id=3, seed=5, accumulation_steps=2)
    one.load_state_dict(json.loads(json.dumps(two[0].state_dict())))
    assert one.state_dict()["rows_consumed"] == two[0].state_dict()["rows_consumed"] == 12
    for _ in range(2):
        step_on_two = [r for ranks in two for r in _rows(next(ranks))]
        step_on_one = [r for _ in range(2) for r in _rows(next(one))]
        assert step_on_two == step_on_one
    back = [TrainBatches(samples, 2, 128, False, pad_id=3, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for ranks in back:
        ranks.load_state_dict(one.state_dict())
    assert [r for ranks in back for r in _rows(next(ranks))] == [r for _ in range(2) for r in _rows(next(one))]
    odd = TrainBatches(samples, 5, 128, False, pad_id=3, seed=5)  # 24 rows consumed: not 5k
    with pytest.raises(ValueError, match="not a whole number of micro-batches of 5 on 1 ranks"):
        odd.load_state_dict(one.state_dict())


@pytest.mark.parametrize("packing", [True, False])
def test_train_batches_deterministic_and_resume_exactly(samples, packing):
    def make():
        return TrainBatches(samples, 4, 128, packing, pad_id=3, seed=11)

    a, b = make(), make()
    per_epoch = a.batches_per_epoch
    first = [next(a) for _ in range(per_epoch + 3)]  # crosses an epoch boundary
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, (next(b) for _ in first)))
    layout = "position_ids" if packing else "attention_mask"
    assert set(first[0]) == {"input_ids", "labels", layout}
    assert _rows(first[0]) != _rows(first[per_epoch])  # epoch 1 is reshuffled
    assert a.state_dict() == {"epoch": 1, "index": 3, "rows_consumed": 12, "world_size": 1, "micro_batch_size": 4}
    for stop in (2, per_epoch):  # mid-epoch and exactly at the end of an epoch
        c = make()
        for _ in range(stop):
            next(c)
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(c.state_dict())))
        for _ in range(3):
            x, y = next(c), next(resumed)
            assert all(torch.equal(x[k], y[k]) for k in x)
    epoch0 = [r for batch in first[:per_epoch] for r in _rows(batch)]
    assert len(set(epoch0)) == len(epoch0)  # no row twice in an epoch
    if not packing:
        assert len(epoch0) == len(samples) // 4 * 4


def test_train_batches_shard_ranks_disjointly_and_match_one_process(samples):
    single = TrainBatches(samples, 2, 128, True, pad_id=3, seed=4, accumulation_steps=2)
    ranks = [TrainBatches(samples, 2, 128, True, pad_id=3, seed=4, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == single.batches_per_epoch // 2
    assert ranks[0].rows_per_epoch == single.rows_per_epoch
    steps = single.batches_per_epoch // 2 + 2  # into the second epoch
    for _ in range(steps):  # one optimizer step: 2 accumulated micro-batches vs 1 per rank
        one = _rows(next(single)) + _rows(next(single))
        per_rank = [_rows(next(r)) for r in ranks]
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert sorted(one) == sorted(per_rank[0] + per_rank[1])
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        TrainBatches(samples[:3], 4, 128, False, pad_id=3, seed=0)


def test_the_data_report_says_why_rows_were_dropped_and_warns_above_ten_percent(tmp_path, tok):
    rows = [*alpaca_rows(6), {"instruction": "x", "answer": "y"}, {"instruction": "z", "answer": "w"},
            {"instruction": "Repeat.", "input": "", "output": "ab " * 200}]
    cfg = cfg_for(write_jsonl(tmp_path / "t.jsonl", rows), max_seq_len=128)
    data = prepare_data(cfg, tok)
    assert (data.report.malformed, data.report.overlong) == (2, 1)
    notes = data.report.notes(cfg)
    assert notes[0][0] == "info" and "first malformed row dropped: row 6 (line 7)" in notes[0][1]
    assert "no output field 'output'" in notes[0][1]
    assert notes[1][0] == "info" and "first overlong row dropped: row 8 (line 9)" in notes[1][1]
    level, warning = notes[2]
    assert level == "warning" and "3 of 9 rows (33%) were dropped, most as malformed (2)" in warning
    assert "data.instruction_field=instruction, output_field=output" in warning
    # Below the threshold: the examples, no warning.
    few = cfg_for(write_jsonl(tmp_path / "few.jsonl", [*alpaca_rows(20), rows[6]]))
    few_data = prepare_data(few, tok)
    assert [level for level, _ in few_data.report.notes(few)] == ["info"]


def test_best_fit_fills_each_row_as_fully_as_any_subset_of_the_samples_left_could():
    """The bounded subset sum behind best_fit (its binary pieces and its early stop): on random
    lengths, the room each call leaves is the smallest any subset of the remaining samples leaves."""
    import itertools
    import random

    from distft.data.batching import _best_subset

    rng = random.Random(7)
    for _ in range(200):
        left = [rng.randint(1, 40) for _ in range(rng.randint(1, 9))]
        room = rng.randint(1, 120)
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(left):
            by_length.setdefault(n, []).append(i)
        chosen = _best_subset(room, sorted(by_length), by_length)
        best = max(s for r in range(len(left) + 1) for c in itertools.combinations(left, r) if (s := sum(c)) <= room)
        assert sum(chosen) == best and all(chosen.count(n) <= left.count(n) for n in chosen)
