"""The training and evaluation loss without a micro-batch's full logits: the output head and the
cross-entropy computed together, a chunk of target tokens at a time.

Why: the next-token loss of `m` sequences of `s` tokens over a vocabulary of V needs, done the
plain way (the head's logits, their fp32 copy, the log-softmax, the logits' gradient), about
four [m*s, V] fp32 tensors alive at once: 4.15 GB for one 2048-token row at Llama-3's 128,256
(bench/RESULTS.md), more than a 7B model's LoRA activations; ~16 GB at 8k tokens. Here the head
never sees the whole micro-batch: the hidden states of the target positions go through it
`chunk_tokens()` rows at a time (a [chunk, V] fp32 block of ~LOSS_CHUNK_BYTES); each block's
loss and its gradients with respect to the hidden states and the head's weight are computed
right there, in the forward, and the block is freed. Backward then only scales what was
computed by the incoming gradient (the loss is a sum; its gradient is a scalar), so it needs
neither the logits nor the weight again. That is Liger-Kernel's fused linear cross-entropy
(`LigerFusedLinearCrossEntropyFunction`, Triton, GPU-only) done with plain torch ops, so it runs
on the CPU too; measured against today's path in bench/loss_path.py.

Only target positions (labels != -100) go through the head: a prompt masked out of the loss
(instruction tuning) costs no head compute at all.

Numerics follow the path they replace: under autocast the head's matmul runs in the autocast
dtype and its output is upcast to fp32 for the log-softmax, the gradient with respect to the
logits (softmax - one-hot, fp32) is cast back to that dtype for the two gradient matmuls, as
autograd does for `F.linear` under autocast. Float16 (loss-scaled) is the exception: its
gradient matmuls run in fp32, because here the gradient is computed before the loss scale is
applied and small probabilities would flush to zero in fp16. The weight's gradient is summed over
the chunks in fp32. In fp32 the loss and every gradient equal the plain path's to float rounding
(tests/unit/test_loss_path.py: <= 1e-6 relative on SmolLM2 and a 128k vocabulary).

How it reaches the model: every engine, and `evaluate.held_out_loss`, calls the model as usual
inside `computing_loss(model, labels)`; that arms the model's output head (the `nn.Linear`
`get_output_embeddings()` returns), whose forward then returns the summed loss of the targets in
place of the logits. The head is still called as a module by the model's own forward, so what
DDP, FSDP2 (the head's weight unsharded for the root's forward) and ZeRO-3 (the weight gathered
by its module hook) do around a module call holds; tied embeddings are one parameter and get
both gradients. A head that is not a plain `nn.Linear` (a LoRA or quantised head) is left alone:
the model returns logits and `token_loss` scores them, as before.
"""

from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
import torch.nn.functional as F

from distft.data.samples import IGNORE_INDEX
from distft.model.build import token_logps, token_loss

# The fp32 logits of one chunk of target tokens: 64 MiB is 130 tokens at Llama-3's 128,256
# vocabulary, 341 at SmolLM2's 49,152, 524 at Llama-2's 32,000. The chunk's working set is about
# twice that (its logits in the compute dtype, then in fp32, the gradient in the compute dtype).
# Large enough that each chunk is a full-sized matmul on a GPU (bench/loss_path.py measured
# tokens/s against the one-shot path), small enough to vanish from the peak.
LOSS_CHUNK_BYTES = 64 * 1024**2


def chunk_tokens(vocab_size: int, tokens: int) -> int:
    """Rows of one chunk: as many as keep its fp32 logits within LOSS_CHUNK_BYTES, at least 1,
    at most `tokens`."""
    return max(1, min(tokens, LOSS_CHUNK_BYTES // (4 * vocab_size)))


def _grad_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, labels_i) over rows, chunk by chunk; the gradients are
    computed in forward and scaled in backward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, compute_dtype):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        rows = hidden.size(0)
        grad_dtype = _grad_dtype(compute_dtype)
        w = weight.to(compute_dtype)
        w_grad = w if grad_dtype == compute_dtype else weight.to(grad_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        step = chunk_tokens(weight.size(0), rows)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows, step):
                h = hidden[start : start + step].to(compute_dtype)
                y = labels[start : start + step]
                # torch's own log-softmax, as the plain path's cross_entropy runs it: the same
                # per-token losses (a logsumexp is more exact, and so differs by ~1e-5 relative)
                log_probs = torch.log_softmax(F.linear(h, w, b).float(), dim=-1)
                loss -= log_probs.gather(1, y[:, None]).sum()
                if not (need_hidden or need_weight or need_bias):
                    continue
                # d loss / d logits = softmax - one-hot, made in place
                grad = log_probs.exp_()
                grad[torch.arange(grad.size(0), device=grad.device), y] -= 1
                grad = grad.to(grad_dtype)
                if need_hidden:
                    grad_hidden[start : start + step] = grad @ w_grad
                if need_weight and grad_dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h.float())
                elif need_weight:  # the chunk's product in the compute dtype, summed in fp32
                    grad_weight += grad.t() @ h.to(grad_dtype)
                if need_bias:
                    grad_bias += grad.float().sum(0)
        ctx.grads = (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight and weight.dtype != torch.float32 else grad_weight,
            grad_bias.to(bias.dtype) if need_bias and bias.dtype != torch.float32 else grad_bias,
        )
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None  # let autograd take the tensors over (no copy)
        scaled = [g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in grads]
        return scaled[0], scaled[1], scaled[2], None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden` [N, H] through the head (`weight` [V, H], `bias`) against
    `labels` [N] (every one a target), in chunks (module docstring); `compute_dtype`: the
    matmuls' dtype (the autocast dtype where autocast is on; default `hidden`'s)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, compute_dtype or hidden.dtype)


class _LinearTokenLogps(torch.autograd.Function):
    """log p(labels_i | hidden_i) [N] fp32 through the head, chunk by chunk. Unlike the summed
    loss, its gradient needs the incoming per-token weights (preference tuning's per-pair sigmoid,
    known only after both answers are scored), so the forward keeps no block and the backward
    computes each chunk's logits again: one more head matmul per target token, no [N, V] tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, compute_dtype):
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        step = chunk_tokens(weight.size(0), hidden.size(0))
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), step):
                log_probs = torch.log_softmax(F.linear(hidden[start : start + step].to(compute_dtype), w, b).float(), -1)
                out[start : start + step] = log_probs.gather(1, labels[start : start + step, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.compute_dtype = compute_dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, labels = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        compute_dtype = ctx.compute_dtype
        grad_dtype = _grad_dtype(compute_dtype)
        w = weight.to(compute_dtype)
        w_grad = w if grad_dtype == compute_dtype else weight.to(grad_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        step = chunk_tokens(weight.size(0), hidden.size(0))
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), step):
                h = hidden[start : start + step].to(compute_dtype)
                y = labels[start : start + step]
                g = grad_out[start : start + step].float()
                # d log p_y / d logits = one-hot - softmax, times each token's incoming weight
                grad = torch.softmax(F.linear(h, w, b).float(), -1).mul_(-g[:, None])
                grad[torch.arange(grad.size(0), device=grad.device), y] += g
                grad = grad.to(grad_dtype)
                if need_hidden:
                    grad_hidden[start : start + step] = grad @ w_grad
                if need_weight:
                    grad_weight.addmm_(grad.t().float(), h.float()) if grad_dtype == torch.float32 \
                        else grad_weight.add_(grad.t() @ h.to(grad_dtype))
                if need_bias:
                    grad_bias += grad.float().sum(0)
        if need_weight and weight.dtype != torch.float32:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias and bias.dtype != torch.float32:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       labels: torch.Tensor, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Each row's log-probability of its label [N] (fp32) through the head, in chunks
    (`_LinearTokenLogps`)."""
    return _LinearTokenLogps.apply(hidden, weight, bias, labels, compute_dtype or hidden.dtype)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class ArmedLoss:
    """What `computing_loss` yields: the labels the armed head scores, and `result(output)` to
    turn the model's output into (summed loss, target tokens)."""

    def __init__(self, labels: torch.Tensor, per_token: bool = False):
        self.labels = labels
        self.per_token = per_token
        self.used = False

    def head_forward(self, head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        labels = self.labels
        # Prompt tuning puts its virtual tokens in front: the last T positions align with labels;
        # position t predicts the label at t + 1.
        hidden = hidden[:, -labels.size(1) :][:, :-1]
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != IGNORE_INDEX
        self.used = True
        dtype = _autocast_dtype(hidden.device) or hidden.dtype
        if not self.per_token:
            return linear_cross_entropy(hidden[keep], head.weight, head.bias, targets[keep], dtype)
        picked = linear_token_logps(hidden[keep], head.weight, head.bias, targets[keep], dtype)
        return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)

    def result(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, target tokens) from what the model returned as its logits: the loss when
        the head was armed, else the logits, scored by `token_loss`. Per token
        (`computing_token_logps`): the [rows, tokens - 1] log-probabilities of the targets (0 elsewhere)."""
        if self.per_token:
            return output if self.used else token_logps(output, self.labels)
        targets = (self.labels[:, 1:] != IGNORE_INDEX).sum()
        if self.used:
            return output, targets
        return token_loss(output, self.labels)


def output_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The model's output head when the chunked loss can stand in for it (a plain `nn.Linear`),
    else None. `model`: the bare transformers model, a PeftModel, or a DDP/DeepSpeed wrapper."""
    while not hasattr(model, "get_output_embeddings") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if type(head) is torch.nn.Linear else None


def _head_forward(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    armed = self.__dict__.get("_distft_armed")
    if armed is None:
        return torch.nn.Linear.forward(self, hidden)
    return armed.head_forward(self, hidden)


@contextlib.contextmanager
def computing_loss(model: torch.nn.Module, labels: torch.Tensor, per_token: bool = False):
    """Within it, one forward of `model` (or of the engine that wraps it) returns the summed loss
    of `labels`' targets as its logits, computed in chunks; yields the ArmedLoss whose `result`
    reads the output. Not re-entrant; other calls of the head (generation) are not affected
    outside it. `per_token`: the targets' log-probabilities [rows, tokens - 1] in place of the
    summed loss (preference tuning; `computing_token_logps`)."""
    armed = ArmedLoss(labels, per_token)
    head = output_head(model)
    if head is None:
        yield armed
        return
    if not isinstance(head.__dict__.get("forward"), types.MethodType):
        head.forward = types.MethodType(_head_forward, head)
    head.__dict__["_distft_armed"] = armed
    try:
        yield armed
    finally:
        head.__dict__.pop("_distft_armed", None)


def computing_token_logps(model: torch.nn.Module, labels: torch.Tensor):
    """`computing_loss` for the targets' log-probabilities: `result(output)` is [rows, tokens - 1]
    fp32, each target position's log p(label | before), 0 elsewhere, computed in chunks when the
    head is a plain `nn.Linear`, else from the logits."""
    return computing_loss(model, labels, per_token=True)
