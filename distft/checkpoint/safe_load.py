"""No code runs from a checkpoint: every pickle a loader would read is checked first, and read
through an exact allow-list.

Threat model (the README's): whoever can write a checkpoint can also rewrite its MANIFEST.json,
so the manifest proves a checkpoint is complete, not that it is harmless. A pickle is a program:
unpickling one may call any importable function. Two of distft's loaders unpickle: DCP reads its
`.metadata` with `pickle.load`, and DeepSpeed reads its `.pt` files with `torch.load(...,
weights_only=False)`. Weights load from safetensors and our own state is JSON, so those two are
the whole attack surface, and each is closed twice:

1. Before anything is loaded, `scan_file` walks every pickle in the checkpoint without running it
   (each global is replaced by an inert stand-in) and refuses any global outside `ALLOWED`,
   deciding the format exactly as the loader will: `.metadata` is one raw pickle (DCP's
   `pickle.load` ignores zip records), a torch file is a zip archive exactly when its first four
   bytes are a local file header (`torch.serialization._is_zipfile`) and its pickles are the records
   torch's own archive reader returns; anything else (the legacy raw format, a TorchScript archive,
   bytes after a pickle's end) is refused, since distft never writes it. A refused checkpoint is set
   aside and an earlier one is used (`distft.checkpoint.store.find_resumable`).
2. The loads themselves go through the same allow-list: DCP's metadata through
   `GuardedReader` (a restricted unpickler that imports only `ALLOWED` globals) with
   `GuardedPlanner`, which refuses the "bytes" items DCP would otherwise `torch.load` with
   `weights_only=False` (distft's DCP state holds tensors only); DeepSpeed's loads run inside
   `weights_only_loads()`, which forces torch's own weights-only unpickler on every `torch.load`.

`ALLOWED` holds fully qualified `(module, name)` pairs, compared exactly: no module prefixes, and no
dotted names (pickle protocol 4 resolves `name` as an attribute path, so `torch.storage` +
`torch.os.system` would otherwise reach `os.system`). It holds containers, tensor rebuilders,
dtypes, storages and the plain data classes of DCP and DeepSpeed: nothing that runs commands,
evaluates code, opens files, imports modules, or unpickles further bytes (`torch.storage.
_load_from_bytes` is not on it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import os
import pickle
import pickletools
import re
from typing import Any

from distft.files import open_regular

# Exact (module, name) pairs a checkpoint pickle may import. Checked against what every engine
# writes (DCP for single/DDP/FSDP; DeepSpeed ZeRO-1/2/3 with offload, full and LoRA). torch's dtypes,
# storage classes, layouts and memory formats (`torch.float32`, `torch.FloatStorage`, ...) are
# added by `_torch_names`, which lists them from torch itself.
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
        ("argparse", "Namespace"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "PurePosixPath"),
    }
)
# Not on the list although DCP defines it: a "bytes" item is unpickled by DCP with
# weights_only=False, and distft's DCP state holds tensors only.
_DCP_BYTES_ITEM = ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata")

ZIP_MAGIC = b"PK\x03\x04"  # what torch.serialization._is_zipfile compares the first bytes with
TORCH_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_EXTENSION_OPCODES = frozenset({"EXT1", "EXT2", "EXT4"})
_SAFE_RELATIVE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that imports something outside `ALLOWED`, or that is not in the format its loader
    expects; the message names what and where."""


@functools.lru_cache(maxsize=1)
def _torch_names() -> frozenset[str]:
    """Names in the `torch` namespace that are dtypes, storage classes, layouts or memory formats."""
    import torch

    names = set()
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            names.add(name)
        elif isinstance(value, type) and issubclass(value, (torch.storage.TypedStorage, torch.UntypedStorage)):
            names.add(name)
    return frozenset(names)


def is_allowed(module: Any, name: Any) -> bool:
    """Exactly `module`.`name` on the allow-list; dotted names (attribute paths) never are."""
    if not isinstance(module, str) or not isinstance(name, str) or "." in name or not name.isidentifier():
        return False
    if module == "torch" and name in _torch_names():
        return True
    return (module, name) in ALLOWED


def pickle_kind(path: str) -> str | None:
    """How distft's loaders read this checkpoint file: 'dcp-metadata' (pickle.load),
    'torch' (torch.load), or None (not unpickled by any loader)."""
    base = os.path.basename(path)
    if base.endswith(".metadata"):  # DCP's `.metadata` and its per-rank `__N.metadata`
        return "dcp-metadata"
    if base.endswith(TORCH_FILE_SUFFIXES):
        return "torch"
    if base.endswith((".pkl", ".pickle")):
        return "pickle"
    return None


# ------------------------------------------------------------------------------------ scanning


class _InertSetstate:
    """`__setstate__` of the stand-ins: recorded on an instance, refused on the class itself
    (BUILD applied to a class object would set attributes on a real class when loaded)."""

    def __get__(self, instance, owner):
        if instance is None:
            raise UnsafePickleError(f"BUILD on the class {owner.qualified} itself (would change a class when loaded)")
        return instance._record_state


class _StandIn:
    """What every allowed global becomes while scanning: accepts any call, state or item and does
    nothing, so a whole pickle can be walked without running any of its code. One subclass per
    global (`_stand_in`), so what was built from what can be inspected afterwards."""

    qualified = "?"

    def __new__(cls, *args, **kwargs):
        instance = object.__new__(cls)
        instance.state = None
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _StandIn()

    __setstate__ = _InertSetstate()

    def _record_state(self, state):
        self.state = state

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _ScanningUnpickler(pickle.Unpickler):
    """Unpickles with every global replaced by an inert stand-in, after checking it against the
    allow-list: each import a pickle can make (GLOBAL, STACK_GLOBAL, INST, EXT*) goes through
    `find_class`, so nothing outside the list is ever imported, let alone called."""

    def __init__(self, stream):
        super().__init__(stream)
        self.built: list[_StandIn] = []
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        if not is_allowed(module, name):
            raise UnsafePickleError(f"pickle would import {module}.{name} (refused: not a tensor or metadata type)")
        key = (module, name)
        if key not in self._classes:
            built = self.built

            def new(cls, *args, **kwargs):
                instance = _StandIn.__new__(cls)
                built.append(instance)
                return instance

            self._classes[key] = type(name, (_StandIn,), {"qualified": f"{module}.{name}", "__new__": new})
        return self._classes[key]

    def persistent_load(self, pid):
        return _StandIn()  # a tensor's storage in a torch archive: the bytes are not read


def _opcode_problem(data: bytes) -> str | None:
    """Opcodes no torch or DCP pickle holds and that sidestep `find_class`: EXT1/2/4 take a global
    from copyreg's extension registry, and once resolved the unpickler serves it from a cache."""
    try:
        for opcode, _, _ in pickletools.genops(data):
            if opcode.name in _EXTENSION_OPCODES:
                return f"pickle uses the extension registry ({opcode.name}; refused: never written by torch or DCP)"
            if opcode.name == "STOP":
                return None
    except Exception as err:  # noqa: BLE001 - a malformed stream is a finding, not a crash
        return f"not a readable pickle ({type(err).__name__}: {err})"
    return None


def scan_pickle_bytes(data: bytes, trailing_allowed: bool = True) -> list[str]:
    """Problems of one pickle (empty: it only builds tensors, containers and metadata types)."""
    problem = _opcode_problem(data)
    if problem:
        return [problem]
    stream = io.BytesIO(data)
    unpickler = _ScanningUnpickler(stream)
    try:
        unpickler.load()
    except UnsafePickleError as err:
        return [str(err)]
    except Exception as err:  # noqa: BLE001 - a malformed stream is a finding, not a crash
        return [f"not a readable pickle ({type(err).__name__}: {err})"]
    problems = []
    if not trailing_allowed and stream.tell() != len(data):
        problems.append(f"{len(data) - stream.tell()} bytes follow the pickle's end (a polyglot file: refused)")
    for built in unpickler.built:  # DCP's file index: names files inside the checkpoint only
        if built.qualified.endswith("._StorageInfo"):
            path = _field(built.state, "relative_path")
            if not isinstance(path, str) or not _SAFE_RELATIVE_PATH.match(path):
                problems.append(f"a storage entry points at {path!r}, outside the checkpoint's state directory")
                break
    return problems


def _field(state: Any, key: str) -> Any:
    """A field of a dataclass's pickled state: a dict, or (dict, slots dict)."""
    if isinstance(state, tuple) and len(state) == 2:
        merged = dict(state[0] or {})
        merged.update(state[1] or {})
        state = merged
    return state.get(key) if isinstance(state, dict) else None


def scan_file(path: str) -> list[str]:
    """Problems of a checkpoint file that a loader would unpickle, read as that loader reads it."""
    kind = pickle_kind(path)
    if kind is None:
        return []
    with open_regular(path, "rb") as f:  # never a FIFO or a link (checkpoint.verify refused them already)
        data = f.read()
    if kind in ("dcp-metadata", "pickle"):
        return scan_pickle_bytes(data, trailing_allowed=False)
    if not data.startswith(ZIP_MAGIC):
        return ["not a torch zip archive: torch.load would read it in the legacy pickle format, which no distft "
                "checkpoint holds (refused)"]
    import torch

    try:
        reader = torch._C.PyTorchFileReader(path)  # the reader torch.load itself uses
        records = reader.get_all_records()
    except Exception as err:  # noqa: BLE001 - an unreadable archive is a finding
        return [f"not a readable torch archive ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"]
    if "constants.pkl" in records or any(r.startswith("code/") for r in records):
        return ["a TorchScript archive (torch.load would hand it to torch.jit.load): refused"]
    if "data.pkl" not in records:
        return ["a torch archive without data.pkl (refused)"]
    problems = []
    for record in records:
        if record.endswith(".pkl"):
            problems += [f"{record}: {p}" for p in scan_pickle_bytes(bytes(reader.get_record(record)))]
    return problems


# ------------------------------------------------------------------------------------- loading


class _RestrictedUnpickler(pickle.Unpickler):
    """The real objects, but only those on the allow-list (the pattern of Python's pickle docs)."""

    def find_class(self, module, name):
        if not is_allowed(module, name):
            raise UnsafePickleError(f"pickle would import {module}.{name} (refused: not a tensor or metadata type)")
        return getattr(importlib.import_module(module), name)


def restricted_load(stream) -> Any:
    """Unpickle `stream` importing only `ALLOWED` globals (and no extension-registry opcodes)."""
    data = stream.read()
    problem = _opcode_problem(data)
    if problem:
        raise UnsafePickleError(problem)
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def guarded_reader(path: str):
    """DCP's file reader, reading `.metadata` through the restricted unpickler.

    A subclass because DCP's storage-reader API is a class to extend; only `read_metadata`
    differs (upstream: `pickle.load`)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class GuardedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = restricted_load(stream)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return GuardedReader(path)


def guarded_planner():
    """DCP's default load planner, refusing "bytes" items (DCP unpickles those with
    `torch.load(weights_only=False)`; distft's DCP state holds tensors only)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class GuardedPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise UnsafePickleError(
                f"the checkpoint stores {read_item.dest_index.fqn!r} as pickled bytes, which distft never writes "
                "(refused: it would be unpickled without restrictions)"
            )

    return GuardedPlanner()


@contextlib.contextmanager
def weights_only_loads():
    """Every `torch.load` inside runs torch's weights-only unpickler, whatever its caller asked for
    (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`; DeepSpeed passes weights_only=False), admitting the non-torch
    classes of `ALLOWED` (DeepSpeed's loss scalers, ZeRO stage enum, ...)."""
    import torch

    extra = []
    for module, name in sorted(ALLOWED):
        if module.startswith("torch"):
            continue  # torch's own weights-only list has its types
        try:
            extra.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # deepspeed not installed, or another Python's pathlib layout
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(extra):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def refusal(err: BaseException) -> str | None:
    """The allow-list's refusal behind a failed load (DCP wraps each rank's error in a
    CheckpointException, torch re-raises its weights-only refusal), or None for another error."""
    seen = set()
    pending = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, pickle.UnpicklingError):
            return str(current).strip().splitlines()[0] if str(current).strip() else type(current).__name__
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        pending += [current.__cause__, current.__context__]
    return None
