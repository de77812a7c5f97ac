"""The shipped data's samples and training batches are the ones distft gave before samples became
memory-mapped arrays and the data went through the cache (issue 18): the hashes below were taken
from the list-based pipeline at commit 3f71089 (every sample's ids and labels, the eval rows and
report; each micro-batch's tensors over two epochs on 1 and 2 ranks). Equal batches with the same
seeds are the default job's losses unchanged."""

from __future__ import annotations

import hashlib

import pytest

from distft.config import DataConfig
from distft.data.batching import TrainBatches, eval_batches
from distft.data.cache import prepared
from distft.data.pipeline import prepare_data
from distft.model.build import build_offline_tokenizer

GOLDEN = {
    "default": {
        "samples": "72a119ce4c86408830fc0db48dcfce97ff3af812e6dd09f3cd448239c411ece9",
        (1, 0): "b0d1caabad716daac234b4bd02c9fc9ce8971d1078aa3c34a9f30046aacbad22",
        (2, 0): "76dcc98e574d4409d18ff43aac20a2fcdb48895d48f5fb01beda71c56bb3f8d4",
        (2, 1): "394951a62c0080d2e1c93d4602a9b4f83b70355967a7cb976420109e7a3b686e",
        "eval": "6adf52d070f21faf847e8657d6c01f65ec43e44f0bc9d74779ee0d7f2eacb423",
    },
    "nopack": {
        "samples": "c05801cf9c46ddd22f0c3db9b35d76262b48877b3cf63aee800d07f772ab1631",
        (1, 0): "afdfe01bd6d86d5771afefe65f2fbaa3d112d825968be98bf1ca92337fe31776",
        "eval": "d52d6d21213ea8d5f39edf827d7876e340c75b4d8da84b1dae4edae92c431750",
    },
}


def tensors_digest(batches) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            h.update(key.encode())
            h.update(batch[key].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", GOLDEN)
def test_the_shipped_datas_samples_and_batches_are_unchanged_through_the_cache(name, tmp_path):
    tok = build_offline_tokenizer()
    # the default job's data (conf/data/synthetic.yaml: template plain, 20,000 rows)
    cfg = DataConfig(template="plain", packing=name != "nopack", cache_dir=str(tmp_path))
    prepared(cfg, tok, 0, str(tmp_path), prepare_data)  # built
    result = prepared(cfg, tok, 0, str(tmp_path), prepare_data)  # read back, memory-mapped
    assert not result.built
    data = result.data
    h = hashlib.sha256()
    for sample in [*data.train, *data.eval]:
        h.update(repr((sample["input_ids"], sample["labels"])).encode())
    h.update(repr(data.eval_rows).encode())
    # The report as it was then; the fields added since (issue 35) are checked on their own below.
    later = ("sources", "formats", "chat_template_unused", "max_seq_len_p90", "max_seq_len_all",
             "identical", "pairs")  # issue 40: preference pairs (the same two answers; a report of pairs)
    h.update(repr({k: v for k, v in data.report.as_dict().items() if k not in later}).encode())
    assert h.hexdigest() == GOLDEN[name]["samples"]
    report = data.report
    assert report.formats == [{"source": "synthetic", "format": "plain", "rows": report.train}]
    assert not report.chat_template_unused  # the built-in tokenizer's template tuned no model
    assert report.identical == 0 and report.pairs is False  # SFT rows are never pairs
    assert 0 < report.max_seq_len_p90 <= report.max_seq_len_all <= cfg.max_seq_len
    for key, digest in GOLDEN[name].items():
        if not isinstance(key, tuple):
            continue
        world, rank = key
        batches = TrainBatches(data.train, 4, cfg.max_seq_len, cfg.packing, tok.pad_token_id, seed=0,
                               rank=rank, world_size=world, accumulation_steps=2 // world)
        count = batches.batches_per_epoch * 2 + 3  # into a third epoch
        assert tensors_digest(next(batches) for _ in range(count)) == digest, key
    held_out = eval_batches(data.eval, 8, cfg.max_seq_len, cfg.packing, tok.pad_token_id)
    assert tensors_digest(held_out) == GOLDEN[name]["eval"]
