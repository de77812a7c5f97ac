"""distft.evaluation.evaluate: metric values by hand, token-weighted held-out loss, greedy generation for plain
and PEFT models (batched == one at a time == a naive reference loop, stops at eos), the report."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from distft.config import EvalConfig, ModelConfig
from distft.evaluation.evaluate import (
    evaluate_model,
    exact_match,
    exact_match_strict,
    generate_answers,
    generation_metrics,
    held_out_loss,
    metrics_only,
    normalize_answer,
    rouge_l,
    token_f1,
)
from distft.evaluation.report import write_report
from distft.model.build import IGNORE_INDEX, build_model, build_offline_tokenizer

BOS, EOS, PAD = 1, 2, 3
# Prompts of different lengths (so a batch needs padding) and their memorised answers.
PAIRS = [
    ("Q: ab\nA: ", "ba"),
    ("Q: hello\nA: ", "HELLO"),
    ("Q: 12+56\nA: ", "68"),
    ("Q: a much longer prompt than the others\nA: ", "ok go"),
]
AFTER_EOS = "junk"  # trained to follow eos, so an answer that does not stop at eos shows it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and they crawl on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_tokenizer()


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def trained_model(tokenizer):
    """The tiny model after memorising PAIRS as `<s>prompt answer</s>junk` (~1 s on the CPU)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig())
    rows = []
    for prompt, answer in PAIRS:
        head = [BOS] + encode(tokenizer, prompt)
        rows.append((head, encode(tokenizer, answer) + [EOS] + encode(tokenizer, AFTER_EOS)))
    width = max(len(h) + len(t) for h, t in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (head, tail) in enumerate(rows):
        n = len(head) + len(tail)
        input_ids[i, :n] = torch.tensor(head + tail)
        attention_mask[i, :n] = 1
        labels[i, len(head) : n] = torch.tensor(tail)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(50):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    return model.eval()


@pytest.fixture(scope="module")
def random_model():
    return build_model(ModelConfig()).eval()


def reference_greedy(model, tokenizer, prompt, max_new_tokens):
    """The naive definition: one unpadded prompt, a full forward per token, argmax, stop at eos."""
    ids = [BOS] + encode(tokenizer, prompt)
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + new])
            token = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
            if token == EOS:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------- metrics


def test_normalize_and_exact_match():
    assert normalize_answer("  The Cat,  sat!\n") == "cat sat"
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("cat", "dog") == 0.0
    # Normalisation is case-blind; the strict variant is not.
    assert exact_match("hello", "HELLO") == 1.0
    assert exact_match_strict("hello", "HELLO") == 0.0
    assert exact_match_strict(" HELLO\n", "HELLO") == 1.0


def test_token_f1_partial_overlap():
    # one shared token of 3 predicted and 2 reference tokens: P=1/3, R=1/2, F1=0.4
    assert token_f1("red blue green", "red yellow") == pytest.approx(0.4)
    # bag of words: order does not matter; "the" is dropped. P=1, R=3/4 -> 6/7
    assert token_f1("cat sat mat", "the cat on the mat sat") == pytest.approx(6 / 7)
    assert token_f1("68", "86") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_rouge_l_values():
    # rouge-score's tokenizer keeps articles: LCS of [cat sat mat] and [the cat on the mat sat] is
    # [cat mat] (or [cat sat]): P=2/3, R=2/6, F=4/9 (F1, a SQuAD-normalised token bag, says 6/7).
    assert rouge_l("cat sat mat", "the cat on the mat sat") == pytest.approx(4 / 9)
    # LCS [the cat on mat] of 6 and 6 tokens: 4/6.
    assert rouge_l("the cat sat on a mat", "The cat was on the mat.") == pytest.approx(2 / 3)
    assert rouge_l("68", "68") == 1.0 and rouge_l("Paris, France.", "paris france") == 1.0
    assert rouge_l("68", "86") == 0.0
    assert rouge_l("café", "café") == 1.0 and rouge_l("café", "cafe") == 0.0  # both "caf"; "caf" vs "cafe"
    assert rouge_l("running", "runs") == 0.0  # no stemming


def test_rouge_l_is_rouge_score_not_squad_tokens():
    # rouge-score splits "3.14" into [3, 14]; SQuAD normalisation (the old tokenizer) made both "314".
    assert rouge_l("3.14", "314") == 0.0
    assert exact_match("3.14", "314") == 1.0  # exact_match stays SQuAD v1.1
    # No [a-z0-9] characters, no tokens: rouge-score gives 0.0, even for the answer itself, and for
    # empty strings; exact_match and f1 still see the Cyrillic answer.
    assert rouge_l("Москва", "Москва") == 0.0 and token_f1("Москва", "Москва") == 1.0
    assert rouge_l("", "") == 0.0 and rouge_l("", "68") == 0.0 and rouge_l("68", "") == 0.0
    # Order matters: the same bag of words (f1 = 1.0), but the longest common subsequence of
    # [the dog bit the man] and [the man bit the dog] is [the bit the]: 3/5. (With the articles
    # dropped, as before, it was 1/3.)
    assert token_f1("the dog bit the man", "the man bit the dog") == 1.0
    assert rouge_l("the dog bit the man", "the man bit the dog") == pytest.approx(3 / 5)


def test_rouge_l_equals_a_direct_rouge_score_call():
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("The U.S.A. won in 1994!", "usa won 1994"),
        ("running fast, the dog", "the dog runs fast"),
        ("3.14159", "3.14"),
        ("a an the", "the"),
        ("Ёлка café 42", "ёлка cafe 42"),
        ("one two three four", "four three two one"),
        ("New York City", "new york"),
    ]
    direct = [scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in pairs]
    assert [rouge_l(prediction, reference) for prediction, reference in pairs] == direct
    # By hand, so a change of rouge-score's tokenizer would show too (the old SQuAD-token scores
    # were 6/7, 1/3, 0, 1, 2/3, 1/4, 4/5).
    assert direct == pytest.approx([0.4, 0.5, 0.5, 0.5, 0.5, 0.25, 0.8])


def test_generation_metrics_means():
    metrics = generation_metrics(["68", "hello", "red blue green"], ["68", "HELLO", "red yellow"])
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["exact_match_strict"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx((1 + 1 + 0.4) / 3)
    assert metrics["rouge_l"] == pytest.approx((1 + 1 + 0.4) / 3)  # LCS 1: P=1/3, R=1/2
    with pytest.raises(ValueError, match="no predictions"):
        generation_metrics([], [])
    with pytest.raises(ValueError, match="references"):
        generation_metrics(["a"], ["a", "b"])


# -------------------------------------------------------------------------------- held-out loss


def sample_ids(tokenizer, text):
    ids = [BOS] + encode(tokenizer, text) + [EOS]
    return ids, [IGNORE_INDEX] + ids[1:]  # every token but bos is a target


def padded_batch(samples):
    width = max(len(ids) for ids, _ in samples)
    batch = {
        "input_ids": torch.full((len(samples), width), PAD),
        "labels": torch.full((len(samples), width), IGNORE_INDEX),
        "attention_mask": torch.zeros((len(samples), width), dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(samples):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][i, : len(ids)] = 1
    return batch


def packed_batch(samples):
    return {
        "input_ids": torch.tensor([sum((ids for ids, _ in samples), [])]),
        "labels": torch.tensor([sum((labels for _, labels in samples), [])]),
        "position_ids": torch.tensor([sum((list(range(len(ids))) for ids, _ in samples), [])]),
    }


def manual_loss_sum(model, ids):
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))), len(ids) - 1


def test_held_out_loss_is_token_weighted(random_model, tokenizer):
    long, short = sample_ids(tokenizer, "a long held-out sample, forty characters"), sample_ids(tokenizer, "hi")
    (long_sum, long_n), (short_sum, short_n) = (
        manual_loss_sum(random_model, long[0]),
        manual_loss_sum(random_model, short[0]),
    )
    random_model.train()
    result = held_out_loss(random_model, [padded_batch([long]), padded_batch([short])], "cpu")
    assert random_model.training  # mode restored
    random_model.eval()
    expected = (long_sum + short_sum) / (long_n + short_n)
    assert result["tokens"] == long_n + short_n
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    mean_of_means = (long_sum / long_n + short_sum / short_n) / 2
    assert abs(mean_of_means - expected) > 1e-3  # the test tells the two apart


def test_held_out_loss_packed_equals_padded(random_model, tokenizer):
    samples = [
        sample_ids(tokenizer, "first sample text"),
        sample_ids(tokenizer, "second"),
        sample_ids(tokenizer, "3rd"),
    ]
    padded = held_out_loss(random_model, [padded_batch(samples)], "cpu")
    packed = held_out_loss(random_model, [packed_batch(samples)], "cpu")
    assert packed["tokens"] == padded["tokens"] == sum(len(ids) - 1 for ids, _ in samples)
    # Packed samples must not see each other (they would with the KV cache on).
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)


def test_held_out_loss_reduce_sum_and_errors(random_model, tokenizer):
    batch = padded_batch([sample_ids(tokenizer, "abc")])
    single = held_out_loss(random_model, [batch], "cpu")
    two_ranks = held_out_loss(random_model, [batch], "cpu", reduce_sum=lambda t: t * 2)
    assert two_ranks["tokens"] == 2 * single["tokens"]
    assert two_ranks["loss"] == pytest.approx(single["loss"])
    with pytest.raises(ValueError, match="zero target tokens"):
        held_out_loss(random_model, [], "cpu")


def test_perplexity_is_capped():
    class Confident(torch.nn.Module):  # puts 1e4 logits on token 0; every target is token 1
        def forward(self, input_ids, **kwargs):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 0] = 1e4
            return type("Out", (), {"logits": logits})()

    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long)}
    result = held_out_loss(Confident(), [batch], "cpu")
    assert result["loss"] == pytest.approx(1e4)
    assert math.isfinite(result["perplexity"]) and result["perplexity"] == pytest.approx(math.exp(100))


def test_held_out_loss_prompt_tuning_matches_peft_loss(random_model, tokenizer):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(random_model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    batch = padded_batch([sample_ids(tokenizer, "prompt tuned"), sample_ids(tokenizer, "xy")])
    with torch.no_grad():
        peft_loss = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert held_out_loss(model, [batch], "cpu")["loss"] == pytest.approx(float(peft_loss), rel=1e-5)


# ----------------------------------------------------------------------------------- generation


def test_generate_answers_stops_at_eos_and_batches(trained_model, tokenizer):
    prompts = [p for p, _ in PAIRS]
    tokenizer.padding_side = "right"
    batched = generate_answers(trained_model, tokenizer, prompts, max_new_tokens=12, batch_size=4, device="cpu")
    assert batched == [a for _, a in PAIRS]  # no "junk": generation stopped at eos
    assert tokenizer.padding_side == "right"
    one_by_one = generate_answers(trained_model, tokenizer, prompts, max_new_tokens=12, batch_size=1, device="cpu")
    assert one_by_one == batched


def test_generate_answers_left_padding_on_random_model(random_model, tokenizer):
    # An untrained model's arbitrary continuations are sensitive to any padding or position error.
    prompts = ["x", "a longer prompt of several words", "mid length"]
    batched = generate_answers(random_model, tokenizer, prompts, max_new_tokens=10, batch_size=3, device="cpu")
    assert batched == [reference_greedy(random_model, tokenizer, p, 10) for p in prompts]
    assert all(batched)


def test_generate_answers_lora(trained_model, tokenizer):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(copy.deepcopy(trained_model), config).eval()
    prompts = [p for p, _ in PAIRS]
    # Fresh LoRA (B = 0) is the base model.
    assert generate_answers(model, tokenizer, prompts, 12, 4, "cpu") == [a for _, a in PAIRS]
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    answers = generate_answers(model, tokenizer, prompts, 12, 4, "cpu")
    assert answers == [reference_greedy(model, tokenizer, p, 12) for p in prompts]
    assert answers != [a for _, a in PAIRS]  # the adapter is used


def prompt_learning_model(base, kind):
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    config_class = PromptTuningConfig if kind == "prompt" else PrefixTuningConfig
    torch.manual_seed(2)
    return get_peft_model(copy.deepcopy(base), config_class(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)).eval()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generate_answers_prompt_learning(random_model, trained_model, tokenizer, kind):
    # peft's own generate gets these wrong under transformers 5 (see distft.evaluation.evaluate's docstring).
    model = prompt_learning_model(random_model, kind)
    prompts = ["x", "a longer prompt of several words", "mid length"]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=10, batch_size=3, device="cpu")
    assert answers == [reference_greedy(model, tokenizer, p, 10) for p in prompts]
    base = generate_answers(random_model, tokenizer, prompts, max_new_tokens=10, batch_size=3, device="cpu")
    assert answers != base  # the virtual tokens are used

    # All-zero virtual tokens barely disturb the trained model: its answers survive, and stop at eos.
    model = prompt_learning_model(trained_model, kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prompt_encoder" in name:
                param.zero_()
    assert generate_answers(model, tokenizer, [p for p, _ in PAIRS], 12, 4, "cpu") == [a for _, a in PAIRS]


# ---------------------------------------------------------------------------- evaluate + report


def test_evaluate_model(trained_model, tokenizer):
    rows = [{"prompt": p, "reference": a, "task": "memo"} for p, a in PAIRS[:2]]
    rows.append({"prompt": PAIRS[2][0], "reference": "69", "task": "add"})  # the model says 68
    rows.append({"prompt": PAIRS[3][0], "reference": PAIRS[3][1], "task": "memo"})  # beyond num_samples
    batches = [padded_batch([sample_ids(tokenizer, "abc"), sample_ids(tokenizer, "hello")])]
    cfg = EvalConfig(num_samples=3, max_new_tokens=12, batch_size=2)
    result = evaluate_model(trained_model, tokenizer, batches, rows, cfg, "cpu")
    assert result["loss"] == pytest.approx(held_out_loss(trained_model, batches, "cpu")["loss"])
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["per_task"]["memo"]["count"] == 2 and result["per_task"]["memo"]["exact_match"] == 1.0
    assert result["per_task"]["add"]["exact_match"] == 0.0
    assert [s["prediction"] for s in result["samples"]] == ["ba", "HELLO", "68"]
    assert result["samples"][2] == {"prompt": PAIRS[2][0], "reference": "69", "prediction": "68", "task": "add",
                                    "truncated": False, "scores": {"exact_match": 0.0, "exact_match_strict": 0.0,
                                                                   "f1": 0.0, "rouge_l": 0.0}}
    assert result["samples"][1]["scores"] == {"exact_match": 1.0, "exact_match_strict": 1.0, "f1": 1.0, "rouge_l": 1.0}
    assert result["num_truncated"] == 0 and result["max_new_tokens"] == 12
    assert "samples" not in metrics_only(result) and metrics_only(result)["f1"] == result["f1"]

    no_loss = evaluate_model(trained_model, tokenizer, None, rows, EvalConfig(num_samples=0), "cpu")
    assert no_loss["loss"] is None and no_loss["exact_match"] is None and no_loss["samples"] == []


def test_answers_cut_at_max_new_tokens_are_flagged_kept_and_marked(trained_model, tokenizer, tmp_path):
    """Issue 19, item 1: every generation is kept with its scores and a truncated flag (no stop
    token within eval.max_new_tokens); the report counts and marks the cut ones and names the file."""
    import json

    from distft.evaluation.evaluate import generate_outputs
    from distft.evaluation.report import predictions_path, write_predictions

    prompts = [p for p, _ in PAIRS]
    # Character tokens: "ba" and "68" fit in 3 new tokens with their eos; "HELLO" and "ok go" do not.
    outputs = generate_outputs(trained_model, tokenizer, prompts, max_new_tokens=3, batch_size=4, device="cpu")
    assert outputs == [("ba", False), ("HEL", True), ("68", False), ("ok", True)]
    rows = [{"prompt": p, "reference": a, "task": "memo"} for p, a in PAIRS]
    cfg = EvalConfig(num_samples=4, max_new_tokens=3, batch_size=4)
    tuned = evaluate_model(trained_model, tokenizer, None, rows, cfg, "cpu")
    assert tuned["num_truncated"] == 2 and tuned["num_generated"] == 4
    base = evaluate_model(trained_model, tokenizer, None, rows, EvalConfig(num_samples=4, max_new_tokens=12), "cpu")
    assert base["num_truncated"] == 0

    report = tmp_path / "eval_report.md"
    predictions = write_predictions(predictions_path(str(report)), {"base": base, "tuned": tuned})
    assert predictions == str(tmp_path / "eval_report.predictions.jsonl")
    records = [json.loads(line) for line in open(predictions)]
    assert len(records) == 4  # all of them, though the report shows one
    assert records[1] == {
        "index": 1, "task": "memo", "prompt": PAIRS[1][0], "reference": "HELLO",
        "outputs": {"base": {"text": "HELLO", "truncated": False, "exact_match": 1.0, "exact_match_strict": 1.0,
                             "f1": 1.0, "rouge_l": 1.0},
                    "tuned": {"text": "HEL", "truncated": True, "exact_match": 0.0, "exact_match_strict": 0.0,
                              "f1": 0.0, "rouge_l": 0.0}}}  # fmt: skip
    write_report(str(report), base, tuned, {"experiment": "cut"}, num_samples=2, predictions=predictions)
    text = report.read_text()
    assert "answers that reached eval.max_new_tokens=3 without a stop token (tuned 2 of 4)" in text
    assert "| HELLO | HELLO | HEL *(cut at 3 tokens)* |" in text
    assert "| ba | ba | ba |" in text  # not cut: no mark
    assert "The first 2 of 4 scored prompts; all 4 in `eval_report.predictions.jsonl`." in text
    assert "ok go" not in text.split("## Samples")[1]  # beyond report_samples: only in the file


def fake_result(loss, em, prediction, per_task_em):
    return {
        "loss": loss, "perplexity": math.exp(loss), "tokens": 100, "exact_match": em, "exact_match_strict": em,
        "f1": em, "rouge_l": em, "num_generated": 1, "per_task": {"add": {"count": 1, "exact_match": per_task_em}},
        "samples": [{"prompt": "Add ```12|56```\n", "reference": "a|b\nc", "prediction": prediction, "task": "add"}],
    }  # fmt: skip


def test_write_report(tmp_path):
    before = fake_result(2.5, 0.25, "base <out>", 0.0)
    after = fake_result(1.25, 0.75, "tuned*out*", 1.0)
    meta = {"experiment": "demo", "technique": "lora", "model": "tiny", "checkpoint": "ckpt/step_10", "steps": 10}
    path = tmp_path / "eval" / "eval_report.md"
    write_report(str(path), before, after, meta, num_samples=8)
    text = path.read_text()
    assert text.startswith("# Evaluation report: demo\n")
    assert "- technique: lora" in text and "- steps: 10" in text
    assert "| metric | base | tuned | change |" in text
    assert "| loss | 2.5000 | 1.2500 | -1.2500 |" in text
    assert (
        f"| perplexity | {math.exp(2.5):.4f} | {math.exp(1.25):.4f} | {math.exp(1.25) - math.exp(2.5):+.4f} |" in text
    )
    assert "| exact_match | 0.2500 | 0.7500 | +0.5000 |" in text
    assert "| rouge_l | 0.2500 | 0.7500 | +0.5000 |" in text
    assert "| add | 1 | 0.0000 | 1.0000 | +1.0000 |" in text
    assert "````text\nAdd ```12|56```\n\n````" in text  # the fence outlasts the prompt's backticks
    assert "| a\\|b<br>c | base &lt;out&gt; | tuned\\*out\\* |" in text
    # The report says how each number is computed, between the tables and the samples.
    how = text.split("## How the metrics are computed\n", 1)[1].split("## Samples", 1)[0]
    assert "## Exact match per task" in text.split("## How the metrics are computed")[0]
    definitions = {line.split(":", 1)[0]: line for line in how.strip().splitlines()}
    assert set(definitions) == {"- loss", "- answers", "- exact_match, f1", "- exact_match_strict", "- rouge_l"}
    assert "token-weighted mean negative log-likelihood" in definitions["- loss"]
    assert "perplexity = exp(loss), with the loss capped at 100" in definitions["- loss"]
    assert "greedy" in definitions["- answers"] and "`eval.max_new_tokens`" in definitions["- answers"]
    assert "SQuAD v1.1" in definitions["- exact_match, f1"]
    assert "identical after stripping" in definitions["- exact_match_strict"]
    assert "rougeL F-measure of the rouge-score package" in definitions["- rouge_l"]
    assert "default tokenizer" in definitions["- rouge_l"] and "no stemming" in definitions["- rouge_l"]

    write_report(str(path), None, after, meta)
    text = path.read_text()
    assert "| metric | tuned |" in text and "| loss | 1.2500 |" in text and "base" not in text
    assert "## How the metrics are computed\n\n- loss: " in text
    assert "| a\\|b<br>c | tuned\\*out\\* |" in text


def test_overfitting_is_called_out_when_eval_rises_while_train_falls():
    from distft.evaluation.report import overfitting

    def history(evals, train):
        return ([{"step": 0, "eval_loss": 5.0}] + [{"step": s, "eval_loss": v} for s, v in evals]
                + [{"step": s, "loss": v} for s, v in train])

    train = [(s, 3.0 - 0.1 * s) for s in range(1, 21)]  # falling all along
    rising = history([(5, 2.0), (10, 1.6), (15, 1.7), (20, 1.8)], train)
    note = overfitting(rising, 2)
    assert note is not None and note.startswith("**Overfitting**: from step 10 to step 20 the eval loss rose 2 evals")
    # Train loss over steps 6-10 (mean 2.2) against 16-20 (mean 1.2).
    assert "(1.6000 -> 1.8000) while the train loss fell (2.2000 -> 1.2000)" in note
    assert overfitting(rising, 3) is None  # only two rises in a row
    assert overfitting(rising, 0) is None
    # Eval rising while train rises too is divergence, not overfitting; a rise then a fall is noise.
    assert overfitting(history([(5, 2.0), (10, 1.6), (15, 1.7), (20, 1.8)], [(s, 1.0 + 0.1 * s) for s in range(1, 21)]),
                       2) is None
    assert overfitting(history([(5, 2.0), (10, 2.1), (15, 1.7), (20, 1.8)], train), 2) is None
    # The base model's eval at step 0 is not a periodic eval: a rise from it does not count.
    assert overfitting(history([(5, 5.5), (10, 6.0)], train), 2) is None
