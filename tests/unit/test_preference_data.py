"""Preference pairs (distft/data/preference.py) on the real SmolLM2 tokenizer and its ChatML
template: each side is the token sequence supervised fine-tuning trains on for the same
conversation, its targets the final answer only; TRL's DPOTrainer tokenizes the same pairs to the
same ids; what carries no preference or cannot be scored whole is rejected by rule."""

from __future__ import annotations

import pytest

from distft.config import DataConfig
from distft.data.preference import RejectedPair, canonical_pair, encode_pair, pair_batch
from distft.data.samples import IGNORE_INDEX

ROWS = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
         "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
         "rejected": [{"role": "assistant", "content": f"Maybe {i + 7}, I think."}]} for i in range(3)]


def chat_config(**changes) -> DataConfig:
    cfg = DataConfig()
    cfg.template, cfg.max_seq_len = "chat", 128
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def targets(encoded) -> list[int]:
    return [t for t in encoded.labels if t != IGNORE_INDEX]


def test_each_side_is_what_sft_trains_on_for_that_conversation(smollm2_tokenizer):
    from distft.data.pipeline import encode

    cfg = chat_config()
    pair = encode_pair(ROWS[1], cfg, smollm2_tokenizer)
    for side, encoded in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        sft, _ = encode({"messages": ROWS[1]["prompt"] + ROWS[1][side]}, "chat", cfg, smollm2_tokenizer)
        assert encoded.input_ids == sft.input_ids and encoded.labels == sft.labels
    # The answer and its end of turn are the targets; the shared prompt (ChatML, SmolLM2's default system turn) not.
    assert smollm2_tokenizer.decode(targets(pair.chosen)) == "2.<|im_end|>"
    assert smollm2_tokenizer.decode(targets(pair.rejected)) == "Maybe 8, I think.<|im_end|>"
    assert pair.chosen.input_ids[:pair.chosen.prompt_len] == pair.rejected.input_ids[:pair.rejected.prompt_len]


def test_trl_tokenizes_the_same_pairs_to_the_same_ids(smollm2_tokenizer, tmp_path):
    """TRL's DPOTrainer on the same conversational rows: the same ids per side; its completion mask
    also scores the newline ChatML writes after <|im_end|>, which SFT (and so distft's pairs) does not."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], use_cpu=True, bf16=False,
                     save_strategy="no")
    trainer = DPOTrainer(model=model, ref_model=LlamaForCausalLM(model.config), args=args,
                         train_dataset=Dataset.from_list(ROWS), processing_class=smollm2_tokenizer)
    theirs = next(iter(trainer.get_train_dataloader()))
    ours = pair_batch([encode_pair(r, chat_config(), smollm2_tokenizer) for r in ROWS], smollm2_tokenizer.pad_token_id)

    def rows(batch, mask_of):
        out = []
        for i in range(batch["input_ids"].size(0)):
            n = int(batch["attention_mask"][i].sum())
            out.append((batch["input_ids"][i, :n].tolist(), mask_of(batch, i)[:n].tolist()))
        return sorted(out)

    trl_rows = rows(theirs, lambda b, i: b["completion_mask"][i])
    our_rows = rows(ours, lambda b, i: (b["labels"][i] != IGNORE_INDEX).long())
    newline = smollm2_tokenizer.convert_tokens_to_ids("Ċ")
    assert [ids for ids, _ in trl_rows] == [ids for ids, _ in our_rows]
    for (ids, trl_mask), (_, our_mask) in zip(trl_rows, our_rows):
        assert ids[-1] == newline and trl_mask[-1] == 1 and our_mask[-1] == 0
        assert trl_mask[:-1] == our_mask[:-1]


def test_a_multi_turn_prompt_scores_only_the_final_answer(smollm2_tokenizer):
    row = {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}],
           "chosen": "Madrid.", "rejected": "Lisbon."}
    pair = encode_pair(row, chat_config(), smollm2_tokenizer)
    assert smollm2_tokenizer.decode(targets(pair.chosen)) == "Madrid.<|im_end|>"  # not "Paris." of the earlier turn
    assert smollm2_tokenizer.decode(targets(pair.rejected)) == "Lisbon.<|im_end|>"


def test_an_implicit_prompt_is_the_conversations_shared_opening():
    user = {"role": "user", "content": "Hi?"}
    kind, row = canonical_pair({"chosen": [user, {"role": "assistant", "content": "Hello!"}],
                                "rejected": [user, {"role": "assistant", "content": "Go away."}], "task": "greet"})
    assert kind == "chat" and row["prompt"] == [user] and row["task"] == "greet"
    assert row["chosen"] == [{"role": "assistant", "content": "Hello!"}]


def test_text_pairs_render_in_the_runs_template(smollm2_tokenizer):
    from distft.data.pipeline import encode

    cfg = chat_config(template="alpaca")
    row = {"prompt": "Reverse the word: stop", "chosen": "pots", "rejected": "spot"}
    pair = encode_pair(row, cfg, smollm2_tokenizer)
    sft, _ = encode({"instruction": row["prompt"], "input": "", "output": "pots"}, "alpaca", cfg, smollm2_tokenizer)
    assert pair.kind == "alpaca" and pair.chosen.input_ids == sft.input_ids
    assert smollm2_tokenizer.decode(targets(pair.rejected)).startswith("spot")


@pytest.mark.parametrize("row, rule, says", [
    ({"prompt": "Q?", "chosen": "Yes.", "rejected": "  Yes. "}, "identical", "the same answer"),
    ({"prompt": "Q?", "chosen": "Yes.", "rejected": " "}, "empty", "blank rejected answer"),
    ({"prompt": " ", "chosen": "Yes.", "rejected": "No."}, "empty", "blank prompt"),
    ({"prompt": "Q?", "chosen": 3, "rejected": "No."}, "malformed", "chosen is not a string or a list"),
    ({"prompt": "Q?", "chosen": "Yes."}, "malformed", "needs the fields 'chosen' and 'rejected'"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}, "malformed",
     "no prompt"),
    ({"prompt": "Q?", "chosen": "word " * 200, "rejected": "No."}, "overlong", "over data.max_seq_len=128"),
])
def test_what_carries_no_preference_or_cannot_be_scored_is_rejected_by_rule(smollm2_tokenizer, row, rule, says):
    with pytest.raises(RejectedPair) as err:
        encode_pair(row, chat_config(), smollm2_tokenizer)
    assert err.value.rule == rule and says in err.value.reason


def test_a_pair_batch_holds_the_chosen_then_the_rejected(smollm2_tokenizer):
    pairs = [encode_pair(r, chat_config(), smollm2_tokenizer) for r in ROWS[:2]]
    batch = pair_batch(pairs, smollm2_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    for i, encoded in enumerate([pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]):
        n = len(encoded.input_ids)
        assert batch["input_ids"][i, :n].tolist() == encoded.input_ids and int(batch["attention_mask"][i].sum()) == n
        assert batch["labels"][i, :n].tolist() == encoded.labels
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_the_data_command_prepares_pairs_and_counts_them(tmp_path, capsys):
    """`python -m distft.data objective=dpo ...` reports the pairs as a run prepares them."""
    import json

    from distft.commands.data import main

    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w.upper()} for w in ("yes", "no", "maybe", "yes")]
    rows.append({"prompt": "Say it.", "chosen": "same", "rejected": "same"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["objective=dpo", "data=jsonl", f"data.path={path}", "data.eval_size=1",
                 f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert ("data: loaded 5 preference rows, dropped 2 (malformed 0, empty 0, identical 1, duplicate 1, overlong 0), "
            "kept 3; train 2 pairs, eval 1") in out
    assert "data: first identical pair dropped: row 4 (line 5) of" in out
    assert "warning: data: 2 of 5 pairs (40%) were dropped, most as" in out
    assert "cache: built " in out  # pairs are cached as SFT samples are; again, found
    assert main(["objective=dpo", "data=jsonl", f"data.path={path}", "data.eval_size=1",
                 f"run.root={tmp_path}"]) == 0
    assert "cache: found " in capsys.readouterr().out


def test_packed_pairs_score_as_the_unpacked_ones_on_smollm2(smollm2, smollm2_tokenizer):
    """data.packing for pairs: a micro-batch's six answers in three rows of 128 tokens (position ids
    restarting per answer, no attention mask), every answer's log-prob that of its own padded row
    (no attention across answers: transformers' block-diagonal mask from the position ids), and
    changing one answer's tokens leaves the others in its row as they were."""
    import torch

    from distft.model.build import build_model, model_inputs
    from distft.model.preference import answer_logps
    from tests.unit.test_prefix_init import config

    pairs = [encode_pair(r, chat_config(), smollm2_tokenizer) for r in ROWS]
    lengths = [len(p.chosen.input_ids) for p in pairs] + [len(p.rejected.input_ids) for p in pairs]
    packed = pair_batch(pairs, smollm2_tokenizer.pad_token_id, pack_len=128)
    rows, width = packed["input_ids"].shape
    assert "attention_mask" not in packed and rows == 3 and width <= 128  # six answers of 30-46 tokens
    assert sorted(int((packed["sequences"] == i).sum()) for i in range(6)) == sorted(lengths)
    model = build_model(config(smollm2).model, torch.float32).eval()
    unpacked = pair_batch(pairs, smollm2_tokenizer.pad_token_id)
    with torch.no_grad():
        expected, tokens = answer_logps(model(**model_inputs(unpacked), use_cache=False).logits, unpacked["labels"])
        got, got_tokens = answer_logps(model(**model_inputs(packed), use_cache=False).logits, packed["labels"],
                                       packed["sequences"])
        assert got_tokens.tolist() == tokens.tolist()
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), (got, expected)
        changed = {k: v.clone() for k, v in packed.items()}
        first = changed["sequences"] == 0
        changed["input_ids"][first] = smollm2_tokenizer.pad_token_id  # answer 0's tokens replaced
        again, _ = answer_logps(model(**model_inputs(changed), use_cache=False).logits, changed["labels"],
                                changed["sequences"])
    assert not torch.isclose(again[0], got[0])
    assert torch.allclose(again[1:], got[1:], rtol=1e-5, atol=1e-4)


def pair_file(path, words, upper: bool = True) -> str:
    import json

    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w.upper() if upper else w[::-1] + "?"} for w in words]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dpo_config(tmp_path, *overrides):
    from distft.preflight import preflight

    cfg, errors = preflight(["+experiment=tiny_dpo", f"run.root={tmp_path}", *overrides], run_here=False)
    assert not errors, errors
    return cfg


def test_pairs_are_cached_and_read_back_as_they_were_prepared(tmp_path, caplog):
    """The data cache holds pairs (objective=dpo) as it holds SFT samples: the chosen answers as
    its train/eval samples, the rejected ones beside them, under a key of their own (the same
    file prepared for SFT is another cache); read back, every pair is the one prepared in memory;
    a rejected answer's array changed on disk is caught by its checksum and the cache rebuilt."""
    import logging
    import os

    import numpy as np

    from distft.data.cache import prepared, prepared_for_run
    from distft.data.pipeline import prepare_data
    from distft.data.preference import pairs_from_prepared, prepare_pairs
    from distft.model.build import load_tokenizer

    words = [f"word{i}" for i in range(12)]
    cfg = dpo_config(tmp_path, "data=jsonl", f"data.path={pair_file(tmp_path / 'pairs.jsonl', words)}",
                     "data.eval_size=2")
    tokenizer = load_tokenizer(cfg.model)
    built = prepared_for_run(cfg, tokenizer)
    found = prepared_for_run(cfg, tokenizer)
    assert built.built and not found.built and found.path == built.path
    memory = prepare_pairs(cfg.data, tokenizer)
    cached = pairs_from_prepared(found.data)
    assert len(cached.train) == len(memory.train) == 10 and len(cached.eval) == 2
    for a, b in zip([*memory.train, *memory.eval], [*cached.train, *cached.eval]):
        for side in ("chosen", "rejected"):
            assert getattr(a, side).input_ids == getattr(b, side).input_ids
            assert getattr(a, side).labels == getattr(b, side).labels
    assert found.data.report.pairs and found.data.eval_rows[0]["reference"] in words
    sft_cfg = dpo_config(tmp_path, "objective=sft", "data=jsonl", f"data.path={tmp_path / 'pairs.jsonl'}",
                         "data.eval_size=2", "data.format=alpaca", "data.instruction_field=prompt",
                         "data.output_field=chosen")
    assert prepared(sft_cfg.data, tokenizer, 0, str(tmp_path), prepare_data).path != built.path
    rejected = os.path.join(built.path, "train_rejected.tokens.npy")
    array = np.load(rejected)
    array[3] = (array[3] + 1) % len(tokenizer)
    with open(rejected, "r+b") as f:  # same size, other content
        f.seek(os.path.getsize(rejected) - array.nbytes)
        f.write(array.tobytes())
    with caplog.at_level(logging.WARNING, logger="distft"):
        again = prepared_for_run(cfg, tokenizer)
    assert again.built and "train_rejected.tokens.npy does not match its checksum" in caplog.text
    assert pairs_from_prepared(again.data).train[0].rejected.input_ids == memory.train[0].rejected.input_ids


def test_pair_sources_mix_by_weight(tmp_path):
    """data.sources for pairs: each file's pairs cleaned and counted, each training pair tagged with
    its source, and an epoch drawn by weight as SFT mixes draw it (3:1 over 12 + 12 pairs: 18 and 6)."""
    from distft.data.cache import prepared_for_run
    from distft.data.preference import PairBatches, pairs_from_prepared
    from distft.model.build import load_tokenizer

    a = pair_file(tmp_path / "a.jsonl", [f"alpha{i}" for i in range(13)])
    b = pair_file(tmp_path / "b.jsonl", [f"beta{i}" for i in range(13)], upper=False)
    cfg = dpo_config(tmp_path, "data=jsonl", f"+data.sources=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]",
                     "data.eval_size=2")
    tokenizer = load_tokenizer(cfg.model)
    data = prepared_for_run(cfg, tokenizer).data
    pairs = pairs_from_prepared(data)
    assert [(s["name"], s["samples"]) for s in data.report.sources] == [("a", 12), ("b", 12)]
    assert len(pairs.train) == 24 and pairs.sources.tolist().count(0) == 12
    batches = PairBatches(pairs.train, 4, tokenizer.pad_token_id, seed=0, sources=pairs.sources, weights=[3.0, 1.0])
    drawn = [int(pairs.sources[int(i)]) for i in batches._order]
    assert (drawn.count(0), drawn.count(1)) == (18, 6)
    chosen = tokenizer.decode(batches._batch([0])["input_ids"][0])
    assert "alpha" in chosen or "beta" in chosen
