"""A start that says what the user can act on and nothing else (issue 35, item 6): third-party
noise silenced by its exact message (tracking.quiet_libraries), every rank's identical report said
once, the over-long rows' warning naming the data.max_seq_len that keeps them, the planner not
calling CPU processes GPUs.

The tests that start a process: tests/cli/test_quiet_start.py."""

from __future__ import annotations

import json
import logging
import warnings


def test_the_silencing_is_scoped_to_those_messages():
    """quiet_libraries drops exactly the named third-party messages: the same loggers' other
    warnings, the libraries' other warnings of the same category and distft's own still show,
    and transformers' other bars (hub downloads) still draw."""
    from transformers.utils import logging as transformers_logging

    from distft.tracking import quiet_libraries

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "DeepSpeed")]
    for logger in loggers:
        logger.addHandler(handler)
    previous_hook = transformers_logging.set_tqdm_hook(None)
    # A training run in this process (train._quiet_libraries) turns every transformers bar off:
    # turn them on here, so what is measured is quiet_libraries' hook alone.
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # pytest's config ignores FutureWarning: undo that here
            quiet_libraries()
            loggers[0].warning("Failed to load CPU gemm_4bit_forward from kernels-community: ... Set "
                               "trust_remote_code=True ...")
            loggers[0].warning("another bitsandbytes warning")
            loggers[1].warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to "
                               "detect it.")
            loggers[1].warning("another DeepSpeed warning")
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2))
            assert model.is_gradient_checkpointing is False  # peft reads it: a FutureWarning before
            warnings.warn("distft's own FutureWarning", FutureWarning, stacklevel=1)
            loading = transformers_logging.tqdm(range(3), desc="Loading weights")
            download = transformers_logging.tqdm(range(3), desc="model.safetensors", disable=False)
            drawn = download.disable is False
            download.close()
    finally:
        transformers_logging.set_tqdm_hook(previous_hook)
        if not bars_were_on:
            transformers_logging.disable_progress_bar()
        for logger in loggers:
            logger.removeHandler(handler)
    assert seen == ["another bitsandbytes warning", "another DeepSpeed warning"]
    assert [str(w.message) for w in caught] == ["distft's own FutureWarning"]
    assert loading.disable is True and drawn


# ----------------------------------------------------------------------------- over-long rows


def _report(tmp_path, max_seq_len: int, drop: bool):
    from distft.data.pipeline import prepare_data
    from distft.model.build import build_offline_tokenizer
    from distft.preflight import preflight

    path = tmp_path / "rows.jsonl"  # 40 rows, one per length
    path.write_text("".join(json.dumps({"instruction": "say it", "output": "x" * n}) + "\n" for n in range(1, 41)))
    cfg, errors = preflight(["data=jsonl", f"data.path={path}", f"data.max_seq_len={max_seq_len}",
                             f"data.drop_overlong={str(drop).lower()}", "data.eval_size=2"], run_here=False)
    assert errors == [], errors
    return cfg.data, prepare_data(cfg.data, build_offline_tokenizer())


def test_the_overlong_warning_names_the_lengths_that_keep_the_rows(tmp_path):
    """Before: "raise data.max_seq_len=48, ..." named the value already set. Now it names the
    data.max_seq_len that keeps 90% of the rows and the one that keeps all, from their lengths."""
    _, whole = _report(tmp_path, 512, drop=True)
    lengths = sorted(whole.train.lengths.tolist() + whole.eval.lengths.tolist())  # every row, measured whole
    assert len(lengths) == 40
    p90, longest = lengths[35], lengths[-1]  # the 36th of 40 rows: 90% are no longer
    cfg, data = _report(tmp_path, lengths[20], drop=True)  # 19 rows over: dropped
    notes = dict((line, level) for level, line in data.report.notes(cfg))
    warning = next(line for line, level in notes.items() if level == "warning")
    assert "most as overlong (19)" in warning, warning
    assert (f"raise data.max_seq_len (now {lengths[20]}): data.max_seq_len={p90} keeps 90% of the rows; "
            f"data.max_seq_len={longest} keeps all of them, or data.drop_overlong=false") in warning, warning


def test_a_row_encoded_in_part_is_longer_than_every_row_measured():
    """A text far longer than data.max_seq_len is encoded only up to max_seq_len + 1 ids (and
    more than 8 characters for each): its length is not known, so it counts as longer than every
    row measured whole, and a length that is its is not named."""
    from distft.data.pipeline import _measured_length
    from distft.data.report import DataReport, _longer_rows_fix, lengths_that_keep

    assert _measured_length(65, chars=200, max_seq_len=64) == 65  # exactly one over, measured whole
    assert _measured_length(65, chars=100_000, max_seq_len=64) == -1  # cut while encoding
    assert _measured_length(70, chars=100_000, max_seq_len=64) == 70
    assert lengths_that_keep(list(range(1, 11))) == (9, 10)
    assert lengths_that_keep([5, 6, 7, 8, 9, 10, 11, 12, 13, -1]) == (13, 0)
    assert lengths_that_keep([-1] * 3 + [70] * 7) == (0, 0)
    assert lengths_that_keep([]) == (0, 0)
    fix = _longer_rows_fix(8, DataReport(max_seq_len_p90=13, max_seq_len_all=0))
    assert fix == ("raise data.max_seq_len (now 8): data.max_seq_len=13 keeps 90% of the rows; some rows are too "
                   "long to be measured whole")
    assert _longer_rows_fix(64, DataReport()) == "raise data.max_seq_len (now 64)"  # no lengths: an older cache's


# ---------------------------------------------------------------------------------- planner


def test_the_plan_of_a_cpu_run_says_cpu_processes_not_gpus():
    """Before: "tiny / full / single on 1 GPU(s)" for the CPU default job. A CPU config's plan
    names CPU processes and a per-process memory; a GPU cluster's plan still names GPUs."""
    from distft.plan import format_text, plan
    from distft.preflight import preflight

    cpu, errors = preflight(["train.device=cpu", "launcher.nproc_per_node=2", "parallel=ddp"], run_here=False)
    assert errors == [], errors
    text = format_text(plan(cpu, with_epoch=False))
    assert "GPU" not in text, text
    assert text.startswith("tiny / full / ddp on 2 CPU process(es), 1 node(s) of local") and "  per process:" in text
    gpu, errors = preflight(["cluster=a100_80g_8x"], run_here=False)
    assert errors == [], errors
    result = plan(gpu, with_epoch=False)
    assert result["device"] == "gpu" and " on 1 GPU(s), " in format_text(result) and "  per GPU:" in format_text(result)
