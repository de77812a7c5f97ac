"""Talk to a model in the terminal: what `distft chat` / `python -m distft.chat RUN_CHECKPOINT_OR_EXPORT
[--base]` loads and asks (the terminal itself: distft/commands/chat.py).

For a person probing a model by hand: each message is rendered exactly as the model saw its
training rows, answered greedily (as the evaluation answers, `evaluate.generate_outputs`, so a
held-out prompt typed here gets the report's answer), and cut at the run's stop tokens.

- A run directory or checkpoint: the run's tuned model (its best checkpoint when the run made that
  its result), or with `--base` its untuned base; the format its training rows were rendered in
  (recorded in the checkpoint: `templates.trained_format`; rows with messages mean chat, whatever
  data.template says) and its stop tokens.
- An export (`python -m distft.export`): the merged model, or `base/` + `adapter/` for prefix and
  prompt tuning (`--base`: `base/` alone); the prompt format written beside it
  (`prompt_format.json`), or for an export without one, its tokenizer's chat template.

The format decides what a conversation is. `data.template=chat`: the whole conversation, every
turn, through the chat template (`--system` sets a system turn). The instruction templates
(`alpaca`, `alpaca_short`, `plain`): each message is one instruction row on its own, the first
line the instruction and the rest its input, as the model was trained (they have no turns).
Input: one line is one message; a line ending in a backslash continues on the next; `/reset`
starts the conversation over, `/exit` (or end of input) leaves.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from distft.checkpoint.export import load_base, load_model
from distft.checkpoint.verify import resolve_checkpoint
from distft.config import DataConfig
from distft.data.pipeline import RejectedRow, encode
from distft.data.templates import stop_token_ids, trained_format
from distft.errors import CheckpointError, DataError, TemplateError
from distft.evaluation.compare import PLACEHOLDER  # an answer whose start marks where the prompt ends; never fed
from distft.evaluation.evaluate import generate_outputs
from distft.files import read_json

PROMPT_FORMAT = "prompt_format.json"  # written by distft.export: how to prompt the exported model
INSTRUCTION_TEMPLATES = ("alpaca", "alpaca_short", "plain")


@dataclasses.dataclass
class Chat:
    model: Any
    tokenizer: Any
    template: str  # data.template: chat, or an instruction template
    stop_ids: list[int]
    max_new_tokens: int
    device: Any = "cpu"
    system: Optional[str] = None
    history: list[dict] = dataclasses.field(default_factory=list)

    def prompt_ids(self, message: str) -> list[int]:
        """The ids the model continues for `message`: its training prefix for this conversation."""
        cfg = DataConfig(template=self.template, max_seq_len=1 << 30)
        if self.template == "chat":
            turns = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            row, kind = {"messages": turns + [{"role": "user", "content": message},
                                              {"role": "assistant", "content": PLACEHOLDER}]}, "chat"
        else:
            instruction, _, context = message.partition("\n")
            row, kind = {"instruction": instruction, "input": context, "output": PLACEHOLDER}, "alpaca"
        try:
            encoded, _ = encode(row, kind, cfg, self.tokenizer)
        except RejectedRow as rejected:
            raise DataError(f"the chat template refuses this conversation: {rejected.reason}") from None
        return encoded.input_ids[: encoded.prompt_len]

    def reply(self, message: str) -> tuple[str, bool]:
        """(the model's answer, whether it was cut at max_new_tokens); the turn joins the history."""
        ids = self.prompt_ids(message)
        [(answer, cut)] = generate_outputs(self.model, self.tokenizer, [ids], self.max_new_tokens, 1, self.device,
                                           stop_ids=self.stop_ids)
        if self.template == "chat":
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer, cut


def _is_export(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json")) or os.path.isdir(os.path.join(path, "adapter"))


def _load_export(path: str, base: bool, trust_remote_code: bool):
    """(model, tokenizer, template, stop ids) of an export directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    split = os.path.isdir(os.path.join(path, "adapter"))
    if base and not split:
        raise CheckpointError(f"{path} is a merged export, which holds no separate base: chat with its run directory "
                              "or checkpoint for --base")
    weights = os.path.join(path, "base") if split else path
    tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(weights, trust_remote_code=trust_remote_code)
    if split and not base:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.join(path, "adapter"))
    fmt_path = os.path.join(path, PROMPT_FORMAT)
    if os.path.exists(fmt_path):
        try:
            fmt = read_json(fmt_path, max_bytes=1 << 20)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{fmt_path} cannot be read ({err}); export the checkpoint again") from None
        return model, tokenizer, fmt["template"], [int(i) for i in fmt["stop_token_ids"]]
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"{path} has no {PROMPT_FORMAT} (written by distft.export) and its tokenizer no chat "
                              "template, so how to prompt it is unknown: chat with the run directory or checkpoint "
                              "instead")
    return model, tokenizer, "chat", stop_token_ids(tokenizer)


def load(path: str, base: bool = False, max_new_tokens: Optional[int] = None, system: Optional[str] = None,
         trust_remote_code: bool = False) -> Chat:
    import torch

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a run directory, a checkpoint or an export")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _is_export(path):
        model, tokenizer, template, stop_ids = _load_export(path, base, trust_remote_code)
        new_tokens = max_new_tokens or 256
    else:
        checkpoint = resolve_checkpoint(path, announce=True)
        cfg, model, tokenizer = load_model(checkpoint, trust_remote_code=trust_remote_code)
        if base:
            model = load_base(cfg, tokenizer=tokenizer)
        template, new_tokens = trained_format(checkpoint, cfg), max_new_tokens or cfg.eval.max_new_tokens
        try:
            stop_ids = stop_token_ids(tokenizer, cfg.data.stop_tokens)
        except TemplateError as err:
            raise CheckpointError(f"{checkpoint}: {err}") from None
    if system and template != "chat":
        raise CheckpointError(f"--system needs a model trained on conversations (messages rows or data.template=chat);"
                              f" this one was trained on single instructions (template {template})")
    if not getattr(model, "is_loaded_in_4bit", False):
        model = model.to(device)
    return Chat(model.eval(), tokenizer, template, stop_ids, new_tokens, device, system)
