"""Sharded training state for the DDP and FSDP engines, through torch.distributed.checkpoint (DCP).

One call on every rank writes the trainable weights and the optimizer state: under FSDP each rank
writes its own shards, under DDP the replicated tensors are written once (DCP deduplicates them).
Keys are parameter names (`get_state_dict`), not optimizer indices, so a checkpoint saved on N
ranks loads on M ranks and under the other engine layout of the same model (DCP reshards on load).

Why the state is split in two:
- tensors (weights, Adam moments, step counters) go to DCP's `.distcp` files, read back as raw
  storage bytes;
- everything else (optimizer hyperparameters, LR schedule, grad-scaler scale) goes to a JSON file.
DCP would pickle non-tensor values into its files and unpickle them on load with
`weights_only=False`; keeping them out means the only pickle left in a DCP checkpoint is its
`.metadata`, which `distft.checkpoint.store` scans before anything is loaded, and which `load` reads
through the same allow-list, refusing any "bytes" item (`distft.checkpoint.safe_load`).

Frozen parameters (a LoRA/QLoRA base) are not saved: the base is rebuilt from the config on resume,
exactly as the first run built it. Full fine-tuning saves every weight, a tied one once
(engines/tied.py).
"""

from __future__ import annotations

import os
import warnings

import torch

from distft.checkpoint.safe_load import guarded_planner, guarded_reader
from distft.engines.tied import tied_aliases, without_aliases
from distft.files import read_json, write_json

STATE_JSON = "engine_state.json"


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


_GROUP = None


def _background_group():
    """A process group of its own for background writes: DCP's planning collectives then never
    interleave with the training step's collectives on the default group. Made once, on every
    rank (the first background save is a collective anyway)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = torch.distributed.new_group(backend="gloo")
    return _GROUP


def save(path: str, model: torch.nn.Module, optimizer, scheduler, scaler=None, background: bool = False):
    """Every rank: write `model`'s trainable weights and `optimizer`'s state into directory `path`.

    `background`: copy the tensors to host memory now, write them in a background thread
    (`dcp.async_save`); returns its Future. Training may change the live tensors right after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    optim_tensors, optim_scalars = split_tensors(optim_state["state"])
    tensors = {"model": without_aliases(model_state, tied_aliases(model)), "optimizer": optim_tensors}
    distributed = torch.distributed.is_initialized()
    future = None
    with warnings.catch_warnings():  # one process: DCP warns that it assumes one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if background:
            group = _background_group() if distributed else None
            future = dcp.async_save(tensors, checkpoint_id=path, process_group=group, no_dist=not distributed)
        else:
            dcp.save(tensors, checkpoint_id=path, no_dist=not distributed)
    if not distributed or torch.distributed.get_rank() == 0:
        rest = {  # taken now: the schedule moves on while the tensors are written
            "param_groups": optim_state["param_groups"],
            "optimizer_scalars": optim_scalars,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        write_json(os.path.join(path, STATE_JSON), rest, "the training state", root=os.path.dirname(path))
    return future


def load(path: str, model: torch.nn.Module, optimizer, scheduler, scaler=None) -> None:
    """Every rank: fill `model`, `optimizer`, `scheduler` (and `scaler`) from a `save` directory,
    whatever the number of ranks and the layout that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # The templates: this rank's shards of every tensor, the optimizer state allocated (torch
    # initialises an empty Adam state with a zero-LR step for that).
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    # A tied weight under its first name only (engines/tied.py): a state saved before that holds
    # both names loads all the same, DCP reading only the keys asked for.
    tensors = {"model": without_aliases(model_state, tied_aliases(model)),
               "optimizer": split_tensors(optim_state["state"])[0]}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        # `.metadata` through the allow-list, and no pickled "bytes" items (distft.checkpoint.safe_load). Read
        # once up front too: inside dcp.load a refusal would come back flattened into a message.
        reader = guarded_reader(path)
        reader.read_metadata()
        dcp.load(tensors, storage_reader=reader, planner=guarded_planner(),
                 no_dist=not torch.distributed.is_initialized())
    rest = read_json(os.path.join(path, STATE_JSON))  # a regular file only (distft.files)
    # Not strict: the frozen weights and a tied weight's second name are missing on purpose (they stay
    # as built; the second name is the parameter its first name fills).
    result = set_state_dict(
        model,
        optimizer,
        model_state_dict=tensors["model"],
        optim_state_dict={"state": merge_scalars(tensors["optimizer"], rest.get("optimizer_scalars", {})),
                          "param_groups": _tuples(rest["param_groups"])},
        options=_options(strict=False),
    )
    missing_trainable = set(result.missing_keys) & set(tensors["model"])
    if result.unexpected_keys or missing_trainable:
        raise RuntimeError(f"the checkpoint's weights do not fit the model: {result}")
    scheduler.load_state_dict(rest["scheduler"])
    if scaler is not None and rest["scaler"] is not None:
        scaler.load_state_dict(rest["scaler"])


def split_tensors(tree: dict) -> tuple[dict, dict]:
    """A nested optimizer state split into its tensors (for DCP) and its other leaves (for the
    JSON file), both keeping the nesting: bitsandbytes counts `step` in a Python int, and nests its
    8-bit state under one key of its own; torch's AdamW has tensors only."""
    tensors, scalars = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            inner_tensors, inner_scalars = split_tensors(value)
            tensors[key] = inner_tensors
            if inner_scalars:
                scalars[key] = inner_scalars
        elif isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            scalars[key] = value
    return tensors, scalars


def merge_scalars(tensors: dict, scalars: dict) -> dict:
    """`split_tensors` undone: the JSON leaves put back into the loaded tensors' nesting."""
    merged = dict(tensors)
    for key, value in scalars.items():
        merged[key] = merge_scalars(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _tuples(param_groups: list[dict]) -> list[dict]:
    """JSON turned the optimizer's tuples (Adam's betas) into lists: give them back as they were."""
    return [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in param_groups]
