"""No code runs from a checkpoint: live payload pickles, generated in many shapes, are refused by
the scan and by both guarded loaders, and the marker file each would create never appears.

Every variant is first shown to be live: loaded the way the real loader loads it (DCP's
`pickle.load`, DeepSpeed's `torch.load(weights_only=False)`), it creates its marker. Then, written
fresh for another marker directory, the scan refuses it, the guarded loader refuses it, and no
marker appears. The variants (tests/payloads.py) cover the four ways the old scan was bypassed (a
dotted global under an allowed prefix, `torch.storage._load_from_bytes`, a raw pickle with a zip
appended, and DCP "bytes" items), protocols 0-5, nesting, the memo, INST/OBJ/EXT opcodes and the
legacy format.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle

import pytest
import torch

from distft.checkpoint.safe_load import (
    UnsafePickleError,
    is_allowed,
    restricted_load,
    scan_file,
    scan_pickle_bytes,
    weights_only_loads,
)
from tests.payloads import EXT_CODE, PROTO4, raw_variants, stack_global_op, text_op, torch_variants


@pytest.fixture
def extension_registered():
    """posix.system under EXT_CODE in copyreg's registry, as a process that registered it would have."""
    copyreg.add_extension("posix", "system", EXT_CODE)
    yield
    copyreg.remove_extension("posix", "system", EXT_CODE)


def _markers(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_every_generated_variant_is_live_when_loaded_unguarded(tmp_path, request):
    """The payloads are real: the loaders as upstream call them run every one."""
    raw, torch_files = raw_variants(str(tmp_path)), torch_variants(str(tmp_path))
    request.getfixturevalue("extension_registered")  # after pickling: os.system pickles as a GLOBAL
    for data in raw.values():
        pickle.loads(data)  # DCP: pickle.load(metadata_file)
    for data in torch_files.values():
        try:
            torch.load(io.BytesIO(data), weights_only=False)  # DeepSpeed's torch_checkpoint_engine
        except Exception:  # noqa: BLE001 - os.system returned an int where a tensor was expected
            pass
    assert _markers(tmp_path) == sorted([*raw, *torch_files])
    assert len(raw) >= 35


def test_the_scan_and_the_guarded_loaders_refuse_every_variant(tmp_path, request):
    markers = tmp_path / "markers"
    markers.mkdir()
    files = tmp_path / "files"
    files.mkdir()
    raw = raw_variants(str(markers))
    request.getfixturevalue("extension_registered")
    # Resolved once, an extension code is served from copyreg's cache without find_class: warm it.
    (tmp_path / "warm").mkdir()
    pickle.loads(raw_variants(str(tmp_path / "warm"))["ext"])
    for name, data in raw.items():
        for path in (files / f"{name}.metadata", files / f"__0{name}.metadata", files / f"{name}.pkl"):
            path.write_bytes(data)
            problems = scan_file(str(path))
            assert problems and ("refused" in problems[0] or "not a readable pickle" in problems[0]), (name, problems)
        with open(files / f"{name}.metadata", "rb") as f, pytest.raises(pickle.UnpicklingError):
            restricted_load(f)  # what DCP's metadata read goes through
        # The same stream in a torch zip archive's data.pkl (DeepSpeed's .pt).
        path = files / f"{name}.pt"
        path.write_bytes(_zip_with_data_pkl(data))
        assert scan_file(str(path)), name
    for name, data in torch_variants(str(markers)).items():
        for suffix in (".pt", ".bin", ".pth", ".ckpt"):
            path = files / f"{name}{suffix}"
            path.write_bytes(data)
            assert scan_file(str(path)), (name, suffix)
        with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
            torch.load(str(files / f"{name}.pt"), weights_only=False)  # as DeepSpeed asks for it
    assert _markers(markers) == []


def _zip_with_data_pkl(data: bytes) -> bytes:
    """A torch archive whose data.pkl is `data`, written with torch's own archive writer."""
    buffer = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(buffer)
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", b"1", 1)
    writer.write_end_of_file()
    return buffer.getvalue()


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
