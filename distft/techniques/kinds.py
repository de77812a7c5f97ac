"""What each `technique.name` is, for the code outside its builder: one row per technique.

A row (`TechniqueKind`) says what a technique trains and how its model is built and saved: its
family (every weight, an adapter in the linear layers, or virtual tokens), whether its frozen base
is quantised, whether export merges it into the base, whether it trains the embeddings, and the
terms the planner's memory model adds for it. The planner (distft/plan/), validation, export
(distft/checkpoint/export.py), the vocabulary check (distft/model/vocab.py) and the model build
(distft/techniques/build.py, distft/engines/) read a technique's row, never its name
(tests/unit/test_layout.py checks that no module outside distft/engines/ and distft/techniques/
compares one).

Adding a technique = one row here + its builder (build.py: its PEFT config) + one
conf/technique/<name>.yaml (tests/unit/test_layout.py checks that the table and conf/ agree).

Imports nothing of distft (and no torch): every module can read it, on a login node too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FAMILIES = ("full", "adapter", "prompt")  # TechniqueKind.family (tests/unit/test_layout.py checks every row's)


@dataclass(frozen=True)
class TechniqueKind:
    """What one `technique.name` is."""

    name: str
    # "full": every weight of the base trains; "adapter": PEFT adapters inside the linear layers
    # (technique.target_modules, r, alpha, dropout), the base frozen; "prompt": PEFT's virtual
    # tokens in front of every sequence (technique.num_virtual_tokens), the base frozen. Read
    # through the properties below.
    family: str
    # The frozen base is quantised to 4 bits by bitsandbytes (technique.quant_*): PEFT's
    # prepare_model_for_kbit_training casts its unquantised weights to fp32, a checkpoint loads
    # one layer at a time, and it is never built on the meta device (bitsandbytes quantises while
    # the weights load).
    quantized_base: bool = False
    # Export merges its trained weights into the base (PEFT's merge_and_unload): one plain model.
    # False for full fine-tuning (the trained model is the result) and for virtual tokens (no
    # merged form: the base and the adapter are exported side by side).
    mergeable: bool = False
    # The input embeddings and the output head train: a tokenizer longer than the embeddings is
    # resized to it (model/vocab.py), and the planner counts the head's gradient.
    trains_embeddings: bool = False
    # DoRA (PEFT use_dora): each adapted weight split into magnitude and direction; the planner
    # adds the activations its magnitude's gradient keeps (plan/memory.py activation_bytes).
    decomposes_weights: bool = False
    # The technique.<key> settings only some techniques read: set for another one they would be
    # silently ignored, so validation refuses them there.
    options: tuple[str, ...] = ()
    # Why train.compile=true is refused with it (None: it compiles). Measured.
    compile_refusal: Optional[str] = None

    @property
    def trains_all_weights(self) -> bool:
        """Full fine-tuning: every weight trains in its own storage (fp32 masters where the engine
        keeps them), norms and embeddings included; no PEFT wrapper."""
        return self.family == "full"

    @property
    def peft(self) -> bool:
        """The trained model is a PEFT model over a frozen base (saved as an adapter)."""
        return self.family != "full"

    @property
    def adapter(self) -> bool:
        """PEFT adapters in the linear layers (technique.target_modules, r, alpha, dropout)."""
        return self.family == "adapter"

    @property
    def virtual_tokens(self) -> bool:
        """Virtual tokens in front of every sequence (technique.num_virtual_tokens): the sequence is
        longer by them, packing and gradient checkpointing do not apply, and generation runs
        without a KV cache (PEFT's virtual tokens break with one)."""
        return self.family == "prompt"


_ADAPTER_OPTIONS = ("r", "alpha", "dropout", "target_modules")
_QUANT_OPTIONS = ("quant_type", "double_quant", "compute_dtype", "quant_storage")
_PREFIX_COMPILE = ("every layer reads its own entry of the prefix's key/value cache, so torch.compile builds a "
                   "graph per layer and stops at its recompile limit (8), running the rest eagerly")
TECHNIQUES: dict[str, TechniqueKind] = {kind.name: kind for kind in (
    TechniqueKind("full", "full", trains_embeddings=True),
    TechniqueKind("lora", "adapter", mergeable=True, options=_ADAPTER_OPTIONS),
    TechniqueKind("qlora", "adapter", quantized_base=True, mergeable=True, options=_ADAPTER_OPTIONS + _QUANT_OPTIONS),
    TechniqueKind("dora", "adapter", mergeable=True, decomposes_weights=True, options=_ADAPTER_OPTIONS),
    TechniqueKind("prefix", "prompt", options=("num_virtual_tokens", "prompt_init_text", "prefix_projection"),
                  compile_refusal=_PREFIX_COMPILE),
    TechniqueKind("prompt", "prompt", options=("num_virtual_tokens", "prompt_init_text")),
)}


def technique_kind(name: str) -> TechniqueKind:
    """The TechniqueKind of `technique.name`; ValueError naming the choices for an unknown one
    (validation refuses it first, with the same list)."""
    try:
        return TECHNIQUES[name]
    except KeyError:
        raise ValueError(f"technique.name={name!r} is not a technique; choose one of {', '.join(TECHNIQUES)}") from None
