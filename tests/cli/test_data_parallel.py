"""Parallel tokenization in real spawned processes (issue 18, scope 3; data.num_proc > 1): the same
samples as one process, and a script without a main guard gets one message instead of a hang.

The in-process tests: tests/unit/test_data_parallel.py."""

from __future__ import annotations

from distft.config import DataConfig
from distft.data import pipeline
from distft.data.pipeline import prepare_data


def test_several_processes_prepare_exactly_the_same_data(tmp_path):
    """data.num_proc=2: real spawned processes, the same samples, eval rows and report."""
    from distft.config import ModelConfig, SyntheticDataConfig
    from distft.data.tokenizers import save_tokenizer
    from distft.model.build import load_tokenizer

    tok = load_tokenizer(ModelConfig(tokenizer=str(save_tokenizer("llama3", tmp_path / "tok"))))
    cfg = DataConfig(synthetic=SyntheticDataConfig(num_examples=3000), max_seq_len=128)
    one = prepare_data(cfg, tok)
    two = prepare_data(DataConfig(synthetic=SyntheticDataConfig(num_examples=3000), max_seq_len=128, num_proc=2), tok)
    assert one.train == two.train and one.eval == two.eval and one.eval_rows == two.eval_rows
    assert one.report == two.report and one.report.train > 2500
    assert pipeline.tokenizing_processes(cfg, 10) == 1  # small data: no processes to start


def test_a_script_without_a_main_guard_gets_one_message_instead_of_a_hang(tmp_path):
    """Spawned tokenizing processes run the user's main script again. Without an
    `if __name__ == "__main__":` guard each of them called prepare_data in turn: multiprocessing.Pool
    replaced the dead processes forever and the build hung, printing a traceback each time. Now the
    build ends within seconds with one DataError that names the guard and data.num_proc=1; the
    same script with the guard still builds."""
    import subprocess
    import sys

    body = ("from distft.config import DataConfig, ModelConfig, SyntheticDataConfig\n"
            "from distft.data.pipeline import prepare_data\n"
            "from distft.model.build import load_tokenizer\n"
            "cfg = DataConfig(synthetic=SyntheticDataConfig(num_examples=600), template='plain', num_proc=2)\n")
    call = "data = prepare_data(cfg, load_tokenizer(ModelConfig()))\nprint('train', data.report.train)\n"
    unguarded, guarded = tmp_path / "unguarded.py", tmp_path / "guarded.py"
    unguarded.write_text(body + call)
    guarded.write_text(body + "if __name__ == '__main__':\n" + "".join("    " + line + "\n" for line in call.splitlines()))
    run = [subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
           for script in (unguarded, guarded)]
    assert run[0].returncode == 1
    assert run[0].stderr.count("Traceback") == 1 and "bootstrapping phase" not in run[0].stderr
    assert run[0].stderr.strip().splitlines()[-1].startswith(
        "distft.errors.DataError: a tokenizing process (data.num_proc=2) ended before its work was done. If distft "
        "runs from a script of your own: Python starts these processes by running that script again, so the code "
        'that calls distft must sit under `if __name__ == "__main__":`.')
    assert "data.num_proc=1 tokenizes in this process instead" in run[0].stderr
    assert run[1].returncode == 0 and run[1].stdout.split() == ["train", "570"], run[1].stderr[-2000:]

