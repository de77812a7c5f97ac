"""`train.compile`: torch.compile of each decoder layer, as torchtitan compiles its blocks.

Each layer is compiled in place (`nn.Module.compile`), before any engine wraps it: the module tree,
the state-dict keys, checkpoints and exports stay those of the eager model, and the DDP / FSDP2 /
ZeRO-1/2 hooks sit outside the compiled region (ZeRO-3's inside it break the graph: refused, as is
prefix tuning, whose per-layer cache entries need a graph per layer; validation). All layers run
the same code and dynamo treats their parameters as inputs (`inline_inbuilt_nn_modules`, torch's
default), so one graph serves every layer: built on the first step, built again for another shape
(the evaluation's batch size; unpacked rows of other lengths then compile with dynamic shapes).
The output head, the chunked loss (distft/model/loss.py) and the embedding stay eager; generation runs
eager (`eager`): its one-token steps would each want graphs of their own. Dropout inside the
layers draws from Inductor's generator, so with dropout > 0 a compiled run is not the eager run's
twin (without dropout its losses equal the eager ones: tests/distributed/test_compile.py). Whether kernels
can be built here (Triton, a C++ compiler) is checked before the run (validation.compile_problem).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from distft.engines.fsdp import decoder_layers


class _RecompileLimits(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: past that limit a function runs
    eagerly for good, which no counter of torch records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message:
            self.hits.append(message)


_LIMITS = _RecompileLimits()


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer of `model` in place; returns how many."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    # Under gradient checkpointing the layer's forward records its outputs in a transformers
    # context variable; eager checkpointing would record them again while recomputing in backward,
    # which dynamo refuses to trace (a graph break in every layer). The recording is not wanted
    # twice: skip it in the recomputation.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    counters.clear()  # compiled_summary counts this run's graphs (a process can train several runs)
    _LIMITS.hits.clear()
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if _LIMITS not in logger.handlers:
        logger.addHandler(_LIMITS)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def compiled_summary(first_step_s: float) -> tuple[str, bool]:
    """After the first step: (a log line on what dynamo built, whether part of it runs eagerly).
    A graph break runs part of every layer eagerly, and a function past the recompile limit runs
    eagerly for good: both are worth a user's attention."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    breaks = counters["graph_break"]
    line = f"train.compile: {graphs} graph(s) built in the first step ({first_step_s:.1f} s, the compile included)"
    problems = []
    if breaks:
        reason, _ = max(breaks.items(), key=lambda kv: kv[1])
        problems.append(f"{sum(breaks.values())} graph break(s), most often: {reason.splitlines()[0][:200]}")
    if _LIMITS.hits:
        problems.append(f"{len(_LIMITS.hits)} function(s) hit the recompile limit and run eagerly from now on")
    if not problems:
        return line + ", no graph breaks", False
    return (f"{line}; {'; '.join(problems)}: parts of each layer run eagerly, slower "
            "(TORCH_LOGS=graph_breaks,recompiles shows each)"), True


@contextlib.contextmanager
def eager():
    """Run compiled modules eagerly inside (generation); a no-op where nothing was compiled."""
    with torch.compiler.set_stance("force_eager"):
        yield
