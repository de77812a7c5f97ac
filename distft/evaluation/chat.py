"""Talk to a model in the terminal: what `distft chat` / `python -m distft.chat RUN_CHECKPOINT_OR_EXPORT
[--base]` loads and asks (the terminal itself: distft/commands/chat.py).

For a person probing a model by hand: each message is rendered exactly as the model saw its
training rows, answered greedily (as the evaluation answers, `evaluate.generate_outputs`, so a
held-out prompt typed here gets the report's answer) or, with a temperature, sampled through the
same decoders (`evaluate.Sampling`; with a seed, reply k of a session draws from seed + k, so the
same seed and messages give the same answers), cut at the run's stop tokens, and streamed as it
is decoded (`_Printer`: what it prints is the returned answer).

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

The context (`context_length`) is the model's max_position_embeddings (less prompt learning's
virtual tokens), not the run's data.max_seq_len: the base was pretrained on its whole context, and
an export records no max_seq_len. A conversation that would not fit with max_new_tokens loses its
oldest user/assistant pairs (`Chat.fit`; never the system turn); a message that does not fit on
its own is refused, and the conversation goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Optional, TextIO

from distft.checkpoint.export import load_base, load_model
from distft.checkpoint.verify import resolve_checkpoint
from distft.config import DataConfig
from distft.data.pipeline import RejectedRow, encode
from distft.data.templates import stop_token_ids, trained_format
from distft.errors import CheckpointError, DataError, TemplateError
from distft.evaluation.compare import PLACEHOLDER  # an answer whose start marks where the prompt ends; never fed
from distft.evaluation.evaluate import Sampling, generate_outputs
from distft.files import read_json

PROMPT_FORMAT = "prompt_format.json"  # written by distft.export: how to prompt the exported model
INSTRUCTION_TEMPLATES = ("alpaca", "alpaca_short", "plain")


@dataclasses.dataclass
class Turn:
    """A message ready to be answered (`Chat.fit`): the ids the model continues, and how many of
    the history's oldest messages (whole user/assistant pairs) were left out for it to fit."""

    message: str
    prompt_ids: list[int]
    dropped: int


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
    temperature: float = 0.0  # 0: greedy, the evaluation's answers; above: sampled
    top_p: float = 1.0  # sampling keeps the likeliest tokens whose probabilities reach top_p
    seed: Optional[int] = None  # reply k of the session draws from seed + k; None: torch's generator as it is
    replies: int = 0  # replies given so far (the next one's k)
    trimmed: bool = False  # whether this conversation has lost its oldest turns (`fit`): said once
    context: Optional[int] = dataclasses.field(init=False)  # context_length(model)
    sampling: Optional[Sampling] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), not {self.temperature}")
        self.sampling = Sampling(self.temperature, self.top_p) if self.temperature > 0 else None
        self.context = context_length(self.model)

    def prompt_ids(self, message: str, history: Optional[list[dict]] = None) -> list[int]:
        """The ids the model continues for `message` after `history` (the conversation's when None):
        its training prefix for this conversation."""
        cfg = DataConfig(template=self.template, max_seq_len=1 << 30)
        if self.template == "chat":
            history = self.history if history is None else history
            turns = ([{"role": "system", "content": self.system}] if self.system else []) + history
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

    def fit(self, message: str) -> Turn:
        """`message` after as much of the conversation as leaves room for max_new_tokens in the
        model's context: its oldest user/assistant pairs go first, the system turn never (the
        history itself changes only when the turn is answered). A message that does not fit on
        its own is a DataError, and the conversation is kept as it was."""
        dropped = 0
        while True:
            ids = self.prompt_ids(message, self.history[dropped:])
            if self.context is None or len(ids) + self.max_new_tokens <= self.context:
                return Turn(message, ids, dropped)
            if dropped >= len(self.history):
                with_system = " with the system turn" if self.system else ""
                raise DataError(f"this message is {len(ids)} tokens as prompted{with_system}, and its answer may take "
                                f"{self.max_new_tokens} (--max-new-tokens): more than the model's context of "
                                f"{self.context} tokens; shorten the message or lower --max-new-tokens")
            dropped += 2

    def answer(self, turn: Turn, stream: Optional[TextIO] = None) -> tuple[str, bool]:
        """(the model's answer to a `fit` turn, whether it was cut at max_new_tokens), written to
        `stream` as it is decoded where one is given; the turn joins the history, and the turns
        it left out leave it."""
        printer = _Printer(self.tokenizer, stream) if stream is not None else None
        with self._draws():
            [(answer, cut)] = generate_outputs(self.model, self.tokenizer, [turn.prompt_ids], self.max_new_tokens, 1,
                                               self.device, stop_ids=self.stop_ids, sampling=self.sampling,
                                               on_token=printer.token if printer else None)
        if printer is not None:
            printer.finish(answer)
        if self.template == "chat":
            del self.history[: turn.dropped]
            self.trimmed = self.trimmed or turn.dropped > 0
            self.history += [{"role": "user", "content": turn.message}, {"role": "assistant", "content": answer}]
        return answer, cut

    def reply(self, message: str, stream: Optional[TextIO] = None) -> tuple[str, bool]:
        """(the model's answer, whether it was cut at max_new_tokens): `answer(fit(message))`."""
        return self.answer(self.fit(message), stream)

    def reset(self) -> None:
        """Start the conversation over (`/reset`)."""
        self.history.clear()
        self.trimmed = False

    @contextlib.contextmanager
    def _draws(self):
        """Where a reply draws its tokens: with a seed, torch's generator seeded with seed + k for
        reply k and given back as it was afterwards, so a session repeats and nothing else's
        draws move it; without, torch's generator as it is."""
        import torch

        k, self.replies = self.replies, self.replies + 1
        if self.sampling is None or self.seed is None:
            yield
            return
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + k)
            yield


class _Printer:
    """Writes an answer to `out` as it is decoded (generate_outputs' `on_token`, which never
    hands it the prompt or a stop token), such that once `finish`ed the text written is the
    answer: the tokens decoded with special tokens skipped, stripped. Each step writes what the
    tokens but the newest decode to, less trailing whitespace and U+FFFD: the newest may still
    change how the text before it decodes (the rest of a multi-byte character, a tokenizer's
    spacing clean-up), and whitespace waits for the text after it (the answer is stripped). A
    decoding that took back what was written (no tokenizer here does) gets the answer whole on
    a new line."""

    def __init__(self, tokenizer: Any, out: TextIO):
        self.tokenizer, self.out, self.tokens, self.shown = tokenizer, out, [], ""

    def token(self, index: int, token: int) -> None:
        self.tokens.append(token)
        self._show(self.tokenizer.decode(self.tokens[:-1], skip_special_tokens=True).strip().rstrip("\ufffd").rstrip())

    def finish(self, answer: str) -> None:
        if not answer.startswith(self.shown):
            self.out.write("\n")
            self.shown = ""
        self._show(answer)

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown) and text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def context_length(model: Any) -> Optional[int]:
    """How many positions a prompt and its answer may take together: the model config's
    max_position_embeddings, less the virtual tokens of prompt and prefix tuning (they take the
    first positions: evaluate._generate_virtual_cached); None where the config names no limit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    limit = getattr(getattr(base, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        limit -= peft_config.num_virtual_tokens
    return limit


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
         trust_remote_code: bool = False, temperature: float = 0.0, top_p: float = 1.0,
         seed: Optional[int] = None) -> Chat:
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
    return Chat(model.eval(), tokenizer, template, stop_ids, new_tokens, device, system, temperature=temperature,
                top_p=top_p, seed=seed)
