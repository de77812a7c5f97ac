"""No code runs from a checkpoint: live payload pickles, generated in many shapes, are refused by
the scan and by both guarded loaders, and the marker file each would create never appears.

Every variant is first shown to be live: loaded the way the real loader loads it (DCP's
`pickle.load`, DeepSpeed's `torch.load(weights_only=False)`), it creates its marker. Then, written
fresh for another marker directory, the scan refuses it, the guarded loader refuses it, and no
marker appears. The variants (tests/payloads.py) cover the four ways the old scan was bypassed (a
dotted global under an allowed prefix, `torch.storage._load_from_bytes`, a raw pickle with a zip
appended, and DCP "bytes" items), protocols 0-5, nesting, the memo, INST/OBJ/EXT opcodes and the
legacy format.

The tests that start a process: tests/cli/test_safe_load.py."""

from __future__ import annotations

import pickle

import torch

from distft.checkpoint.safe_load import (
    UnsafePickleError,
    is_allowed,
    restricted_load,
    scan_file,
    scan_pickle_bytes,
)
from tests.payloads import PROTO4, stack_global_op, text_op


def test_the_allow_list_is_exact(tmp_path):
    assert is_allowed("torch._utils", "_rebuild_tensor_v2")
    assert is_allowed("torch", "float32") and is_allowed("torch", "BFloat16Storage") and is_allowed("torch", "strided")
    assert is_allowed("torch.distributed.checkpoint.metadata", "TensorStorageMetadata")
    for module, name in [("torch.storage", "_load_from_bytes"), ("torch.storage", "torch.os.system"),
                         ("torch", "load"), ("torch", "os"), ("torch", "float32.__class__"),
                         ("torch._utils", "_rebuild_tensor_v2.__globals__"), ("torch.storage.x", "FloatStorage"),
                         ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
                         ("builtins", "eval"), ("builtins", "getattr"), ("posix", "system"), ("torch", "Tensor ")]:
        assert not is_allowed(module, name), (module, name)


def test_a_class_changed_by_build_is_refused():
    """BUILD applied to an allowed class itself (not an instance) would set attributes on the real
    class when loaded: refused."""
    stream = PROTO4 + stack_global_op("argparse", "Namespace") + b"N}" + text_op("__repr__") + b"K\x01s\x86b."
    problems = scan_pickle_bytes(stream)
    assert problems and "BUILD on the class argparse.Namespace" in problems[0]


def test_dcp_storage_entries_must_stay_inside_the_checkpoint(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    ok = pickle.dumps({"i": _StorageInfo("__0_0.distcp", 0, 8)}, protocol=4)
    assert scan_pickle_bytes(ok) == []
    for path in ("../../../etc/shadow", "/etc/shadow", "sub/../../x"):
        bad = pickle.dumps({"i": _StorageInfo(path, 0, 8)}, protocol=4)
        assert "outside the checkpoint's state directory" in scan_pickle_bytes(bad)[0], path


def test_benign_pickles_of_every_kind_pass(tmp_path):
    """What the engines really write is accepted: a torch archive of tensors and optimizer-like
    state in several dtypes, and a DCP metadata pickle (every protocol)."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    state = {"optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, 3)}},
                                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]},
             "bf16": torch.ones(2, dtype=torch.bfloat16), "i64": torch.arange(3), "param": torch.nn.Parameter(torch.ones(1)),
             "dtype": torch.float16, "size": torch.Size([2, 3]), "device": torch.device("cpu")}
    torch.save(state, tmp_path / "ok.pt")
    assert scan_file(str(tmp_path / "ok.pt")) == []
    meta = Metadata({"model.w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([2]),
                                                      [ChunkStorageMetadata(torch.Size([0]), torch.Size([2]))])},
                    storage_data={MetadataIndex("model.w", torch.Size([0])): None})
    for protocol in range(2, 6):
        (tmp_path / ".metadata").write_bytes(pickle.dumps(meta, protocol=protocol))
        assert scan_file(str(tmp_path / ".metadata")) == [], protocol
        with open(tmp_path / ".metadata", "rb") as f:
            assert restricted_load(f).state_dict_metadata.keys() == {"model.w"}


def test_a_torchscript_archive_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "m.pt"))
    assert "TorchScript" in scan_file(str(tmp_path / "m.pt"))[0]


def test_unsafe_pickle_error_is_an_unpickling_error():
    assert issubclass(UnsafePickleError, pickle.UnpicklingError)
