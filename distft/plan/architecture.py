"""What the planner counts: the architecture a run will really build, and its exact parameters.

Parameters are counted on a model built on the meta device from the preset's architecture (no
memory, no download: a hub id's own config.json is not fetched), with the technique applied the
way training applies it (PEFT adapters or virtual tokens on the meta device too). QLoRA's 4-bit
layers cannot be built on meta: the base is counted unquantised and the weights bitsandbytes
would quantise (every nn.Linear of the decoder layers; the output head stays in the compute
dtype) are reported as `params_quantized`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from distft.config import Config
from distft.errors import PlanInputError
from distft.model.build import ParameterCounts
from distft.model.build import count_parameters as count_model_parameters
from distft.techniques.build import build_meta_model
from distft.techniques.kinds import technique_kind

ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
def model_config_file(name_or_path: Optional[str]) -> Optional[str]:
    """The config.json of a model on local disk: in its directory, or in the Hugging Face cache
    for a hub id (looked up offline: planning never downloads)."""
    import os

    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: there is nothing cached under it
        return None
    return found if isinstance(found, str) else None


def with_architecture(cfg: Config) -> tuple[Config, str]:
    """cfg with the architecture the run will really build, and where it came from: a model's own
    config.json when it is on local disk (training loads that, whatever the preset's fields say;
    fields it leaves out take transformers' defaults, as they will when it loads), else the
    preset's fields."""
    import json
    import os

    path = model_config_file(cfg.model.name_or_path)
    if path is None:
        if cfg.model.name_or_path is None:
            return cfg, f"model={cfg.model.name} from scratch"
        return cfg, (f"the model={cfg.model.name} preset's fields ({cfg.model.name_or_path!r} has no config.json "
                     "on local disk)")
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as err:
        raise PlanInputError(f"model.name_or_path: {path} cannot be read as JSON ({err}); fix or replace it") from err
    from transformers import AutoConfig, LlamaConfig

    model_type = found.get("model_type", "llama")
    try:
        config = (LlamaConfig(**found) if model_type == "llama" else
                  AutoConfig.from_pretrained(os.path.dirname(path), local_files_only=True,
                                             trust_remote_code=cfg.model.trust_remote_code))
    except Exception:  # noqa: BLE001 - a type transformers does not know here: its sizes on LLaMA's defaults
        config = LlamaConfig(**{k: v for k, v in found.items() if k != "model_type"})
    defaults = LlamaConfig()
    fields = {}
    for name in ARCHITECTURE_FIELDS:
        value = getattr(config, name, None)
        fields[name] = value if value is not None else getattr(defaults, name)
    if not getattr(config, "num_key_value_heads", None):
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if model_type == "llama":
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields)), path
    source = f"{path} (model_type {model_type!r}: counted as a LLaMA of its sizes, approximate)"
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields)), source


def count_parameters(cfg: Config) -> ParameterCounts:
    """Exact counts for the configured model. Decoder layers are all alike, so every count is
    linear in their number: meta models of one and of two layers give it exactly (asserted for
    every preset against the published counts), in a fraction of a second where building all 80
    layers of a 65B, adapters included, takes seconds, once more for each piece of advice."""

    layers = cfg.model.num_hidden_layers
    if layers <= 2:
        return _count_built(cfg)
    one, two = (_count_built(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_hidden_layers=n)))
                for n in (1, 2))

    def scaled(field: str) -> int:
        return getattr(one, field) + (layers - 1) * (getattr(two, field) - getattr(one, field))

    return ParameterCounts(scaled("total"), scaled("trainable"), scaled("frozen"), scaled("quantized"),
                           two.largest_layer, two.largest_module, scaled("trainable_below_8bit"),
                           scaled("trainable_below_paging"))


def _count_built(cfg: Config) -> ParameterCounts:
    model = build_meta_model(from_fields(cfg))
    return count_model_parameters(model, quantized_base=technique_kind(cfg.technique.name).quantized_base)


def from_fields(cfg: Config) -> Config:
    """cfg whose model is built from its architecture fields (with_architecture put a local
    model's own there): nothing is read from name_or_path, no attention kernel needs installing."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=None, attn_implementation="sdpa"))
