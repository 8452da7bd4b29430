"""Peak memory of one training step, counted without a GPU.

`LiveBytes` is a dispatch mode that keeps the byte size of every storage alive (a weak reference
per storage, dropped when the storage is freed) and the largest total seen. Run inside
`FakeTensorMode`, the tensors have shapes and dtypes but no data, so a whole LLaMA-3.1-8B step
(forward, label-only loss, backward, AdamW step) is counted on a laptop; run on real tensors, the
same count is what `measured_cpu_peak` checks against the CPU allocator's own events.

Bytes are storage sizes (numel x element size), the allocator's rounding and workspaces excluded.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

WEIGHTS, ADAPTERS, ACTIVATIONS, LOGITS = "weights", "adapters+grads+optimizer", "activations", "logits"
CATEGORIES = (WEIGHTS, ADAPTERS, ACTIVATIONS, LOGITS)


@dataclass
class _Live:
    """One live storage: its bytes and the category it was counted under."""

    nbytes: int
    category: str


@dataclass
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live storages; `peak` the largest total, `at_peak` its breakdown.

    A new storage made by an op is counted as `logits` when its last dimension is `vocab_size`
    (the label-only loss's chunk of logits and their softmax), else as `activations`; `register`
    files tensors made before the mode (weights, adapters, optimizer state) under a category.
    """

    vocab_size: int
    live: dict[int, _Live] = field(default_factory=dict)
    peak: int = 0
    at_peak: dict[str, int] = field(default_factory=dict)
    _total: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    def register(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count (or re-file) the storages of `tensors` under `category`."""
        for t in tensors:
            self._track(t, category)
        self._update_peak()

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self.peak = 0
        self._update_peak()

    def breakdown(self) -> dict[str, int]:
        """Bytes live now, per category."""
        out = dict.fromkeys(CATEGORIES, 0)
        for item in self.live.values():
            out[item.category] = out.get(item.category, 0) + item.nbytes
        return out

    def _track(self, t: torch.Tensor, category: Optional[str]) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            if category is not None:
                self.live[key].category = category
            return
        if category is None:
            category = LOGITS if t.dim() > 0 and t.shape[-1] == self.vocab_size else ACTIVATIONS
        nbytes = st.nbytes()
        self.live[key] = _Live(nbytes, category)
        self._total += nbytes
        weakref.finalize(st, self._forget, key)

    def _forget(self, key: int) -> None:
        item = self.live.pop(key, None)
        if item is not None:
            self._total -= item.nbytes

    def _update_peak(self) -> None:
        if self._total > self.peak:
            self.peak = self._total
            self.at_peak = self.breakdown()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, None)
        self._update_peak()
        return out


def trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The trainable parameters, their gradients and the optimizer's state tensors."""
    out: list[torch.Tensor] = []
    for p in model.parameters():
        if p.requires_grad:
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
    for state in optimizer.state.values():
        out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return out


def frozen_state(model: nn.Module) -> list[torch.Tensor]:
    """The frozen parameters and all buffers of `model` (the base weights, rotary tables, caches)."""
    return [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())


def count_step_peak(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], Any],
                    vocab_size: int, warmup_steps: int = 1) -> LiveBytes:
    """Run `step()` `warmup_steps` times (so that AdamW's state exists), then once more counting its peak.

    `step` runs forward, loss, backward and `optimizer.step()` and leaves the gradients set to None
    (zero_grad) at its start, as the trainer's loop does. The returned counter's `peak` is in bytes.
    """
    counter = LiveBytes(vocab_size)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: counter.register([p.grad], ADAPTERS))
             for p in model.parameters() if p.requires_grad]
    try:
        with counter:
            _count_steps(counter, model, optimizer, step, warmup_steps)
    finally:
        for h in hooks:
            h.remove()
    return counter


def _count_steps(counter: LiveBytes, model: nn.Module, optimizer: torch.optim.Optimizer,
                 step: Callable[[], Any], warmup_steps: int) -> None:
    """The body of `count_step_peak`, inside the counting mode."""
    counter.register(frozen_state(model), WEIGHTS)
    counter.register(trainable_state(model, optimizer), ADAPTERS)
    for _ in range(warmup_steps):
        step()
    counter.register(trainable_state(model, optimizer), ADAPTERS)
    optimizer.zero_grad(set_to_none=True)
    counter.reset_peak()
    step()


def measured_cpu_peak(step: Callable[[], Any], live_before: int) -> int:
    """The peak bytes of one `step()` on real CPU tensors from the CPU allocator's own events
    (`torch.profiler` with `profile_memory`): `live_before` (bytes already allocated) plus the
    largest running sum of the allocations and frees reported during the step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running, peak = 0, 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            running += e.nbytes()
            peak = max(peak, running)
    return live_before + peak


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def block_label_loss(model: nn.Module, tokens: torch.Tensor, prompt_len: int,
                     chunk_rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's label-only loss (`CausalLMLoss`) for unpadded rows (B, T) whose labels are every
    position from `prompt_len` on: the same rows of hidden states, taken by slicing instead of a
    boolean mask (fake tensors cannot run data-dependent indexing).
    Returns (the fp32 scalar sum of cross-entropies, the auxiliary loss)."""
    from moa.method.routers import collect_aux_loss
    from moa.train.loss import label_cross_entropy

    hidden = model.hidden_states(tokens)  # (B, T, dim)
    rows = hidden[:, prompt_len - 1:-1].reshape(-1, hidden.shape[-1])  # (B * (T - prompt_len), dim)
    targets = tokens[:, prompt_len:].reshape(-1)
    return label_cross_entropy(rows, model.output.weight, targets, chunk_rows), collect_aux_loss(model)


def block_label_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
                     prompt_len: int, bf16: bool) -> Callable[[], None]:
    """One training step as a closure: bf16 autocast (when `bf16`) around the forward and the loss,
    backward of the mean label loss, AdamW step, gradients set to None."""
    n_labels = tokens.shape[0] * (tokens.shape[1] - prompt_len)

    def step() -> None:
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, aux = block_label_loss(model, tokens, prompt_len)
        (loss / n_labels + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step
