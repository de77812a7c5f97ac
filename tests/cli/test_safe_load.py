"""The checkpoint payloads are live: loaded unguarded, each runs its `os.system` (a real shell) and
creates its marker; then the scan and both guarded loaders refuse every variant (the extension
code is warmed by running one).

The in-process tests: tests/unit/test_safe_load.py."""

from __future__ import annotations

import copyreg
import io
import os
import pickle

import pytest
import torch

from distft.checkpoint.safe_load import (
    restricted_load,
    scan_file,
    weights_only_loads,
)
from tests.payloads import EXT_CODE, raw_variants, torch_variants


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

