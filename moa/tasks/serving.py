"""Many task adapters on one model, in process: load once, then route and generate as often as
wanted (Adapters Selector's `ModelWithSelector(...).generate(datapoint)`).

    model = TaskRoutedModel.load("models/smollm2", "runs/tasks/tasks.json", "runs/tasks/selector.pt")
    outs = model.generate([{"instruction": "What is 2 + 3?"}, "Is the sky green?"], max_gen_len=64)
    outs[0]["generate"], outs[0]["selected_task"], outs[0]["adapter_weights"]
    model.generate(rows, fusion="topp", top_p_adapters=0.9)   # again, the same loaded model
    # a data config and an adapter pool instead of a registry JSON (moa.tasks.registry.load_pool_registry):
    TaskRoutedModel.load("models/smollm2", load_pool_registry("data_config.json", "adapter_pool.json"), "selector.pt")

The base, the registry's adapters (`moa.tasks.routing.TaskAdapters`: the plain LoRAs as one bank, the
other adapters read once and held for swapping) and the selector are loaded once. Each call embeds its
rows with the bare base, routes them (`moa.tasks.routing.route_rows`), and generates them in
length-sorted batches: the bank's rows mixed freely, each on its own LoRA(s); the rows of a Soft MoA,
HydraLoRA or other non-LoRA task adapter in batches of their own with that adapter attached (adapters
of equal flags attached once, their state copied in). Every row gets exactly what it generates alone
with its adapter(s) (greedy), and each call leaves the model as loaded (no adapter left attached, the
base tensors as they were).
"""
from __future__ import annotations

import os
from typing import Any, Sequence, Union

import torch

from llama.checkpoint import load_model
from llama.generation import generate
from llama.model import Transformer
from moa.checks import check_int
from moa.infer.dtype import resolve_kv_cache_dtype
from moa.infer.generate import make_batches, make_prompts
from moa.tasks.registry import Registry, as_registry
from moa.tasks.routing import RoutingPlan, TaskAdapters, load_routing, route_rows
from moa.tasks.selector import Selector, check_selector_base, load_selector

Row = Union[dict, str]  # a test row ({"instruction", "input"?}) or an instruction alone


class TaskRoutedModel:
    """A frozen base with a registry's task adapters on it (`adapters`: its plain LoRAs as one bank, the
    others held for swapping in), and the selector that routes rows onto them."""

    def __init__(self, model: Transformer, tokenizer: Any, selector: Selector, adapters: TaskAdapters):
        self.model, self.tokenizer, self.selector, self.adapters = model, tokenizer, selector, adapters

    @classmethod
    def load(cls, base_dir: str | os.PathLike, registry: Registry | str | os.PathLike, selector: str | os.PathLike,
             *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "TaskRoutedModel":
        """The base of `base_dir`, the adapters of `registry` and the selector file trained on it.
        `registry`: a registry JSON or domain/task/ tree (as `--adapter_registry`), or a `Registry`, e.g.
        an Adapters Selector data config and adapter pool, `load_pool_registry(data_config, adapter_pool)`. The
        registry and the selector are read and checked (`check_selector_base`: the selector's base) before
        the base is loaded."""
        reg = as_registry(registry)
        sel = load_selector(selector)
        check_selector_base(sel, selector, base_dir, base_flag="base_dir")
        model, tokenizer = load_model(base_dir, dtype=dtype, device=device)
        model.eval()
        sel, adapters = load_routing(model, reg, sel, base_dir=str(base_dir))
        return cls(model, tokenizer, sel, adapters)

    @property
    def tasks(self) -> list[str]:
        return self.adapters.tasks

    def route(self, rows: Sequence[Row], fusion: str = "top1", top_p_adapters: float = 0.9) -> RoutingPlan:
        """The routing of `rows` (task probabilities, each row's adapter weights) without generating.
        A top-p set that fuses a non-LoRA task adapter with others is a ValueError (`RoutingPlan`)."""
        return route_rows(self.model, self.tokenizer, _as_rows(rows), self.selector, self.adapters, fusion,
                          top_p_adapters)

    @torch.inference_mode()
    def generate(self, rows: Sequence[Row], max_gen_len: int = 200, *, fusion: str = "top1",
                 top_p_adapters: float = 0.9, temperature: float = 0.0, top_p: float = 1.0,
                 max_batch_size: int = 16, seed: int = 0, kv_cache_dtype: str = "auto") -> list[dict]:
        """Route and generate `rows`; one dict per row, in order: `generate` (the new text),
        `selected_task` (top-1) and `adapter_weights` ({task: weight} of the adapters it ran with).
        `kv_cache_dtype`: auto | float32 | bfloat16, as example.py's --kv_cache_dtype."""
        check_int("max_gen_len", max_gen_len, 1)
        check_int("max_batch_size", max_batch_size, 1)
        rows = _as_rows(rows)
        plan = self.route(rows, fusion, top_p_adapters)
        context = self.model.args.max_seq_len
        prompts = make_prompts(self.tokenizer, rows, list(range(len(rows))), context, max_gen_len, 1)
        weight = self.model.tok_embeddings.weight
        kv_dtype, _ = resolve_kv_cache_dtype(kv_cache_dtype, weight.dtype, weight.device)
        generator = torch.Generator(device=weight.device).manual_seed(seed)
        out: list[dict] = [{} for _ in rows]
        with plan.serving():  # the model is put back at the end, also after an error
            for part in plan.partition(prompts):
                for batch in make_batches(part, max_batch_size, context):
                    with plan.rows(batch):
                        new = generate(self.model, [p.tokens for p in batch], max(p.budget for p in batch),
                                       temperature=temperature, top_p=top_p, tokenizer=self.tokenizer,
                                       generator=generator, kv_cache_dtype=kv_dtype)
                    for p, tokens in zip(batch, new):
                        out[p.index] = {"generate": self.tokenizer.decode(tokens[: p.budget]),
                                        **plan.row_info(p.index)}
        return out


def _as_rows(rows: Sequence[Row]) -> list[dict]:
    if isinstance(rows, (str, dict)):
        raise ValueError("TaskRoutedModel: give a list of rows (dicts with 'instruction') or of instructions")
    out = []
    for i, r in enumerate(rows):
        row = {"instruction": r} if isinstance(r, str) else r
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise ValueError(f"TaskRoutedModel: row {i} has no 'instruction' text")
        out.append(row)
    return out
