"""Whole-model behaviour of every adapter kind on a tiny random LLaMA (fp32, CPU).

References: the bare model (fresh adapters; sparse at threshold 1), Soft MoA (sparse at threshold 0),
the dense masked computation (sparse gather/scatter), the unpadded row (padding), the full forward
(KV-cache decode). Relative tolerances (||a - b|| / ||b||) are in each test's name.
"""
import pytest
import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from moa import MoAConfig, RouterStats, adapter_state_dict, attach_adapters, collect_aux_loss, load_adapter_state_dict
from moa.method.routers import BlockRouter, Route
from tests.helpers import rel

TINY = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
ALL = dict(lora_layers="0-4", lora_targets="Q,K,V,O,FFN_DOWN", lora_rank=4, p_adapter_layers="0-4",
           p_adapter_size=8, prompt_layers="0-4", prompt_len=3)
CONFIGS = {
    "lora": dict(lora_layers="0-4", lora_targets="Q,K,V,O,FFN_UP,FFN_GATE,FFN_DOWN", type_router="none"),
    "molora": dict(lora_layers="0-4", expert_num=3, type_router="none"),
    "hydralora": dict(lora_layers="0-4", expert_num=3, hydra_moe=True, type_router="none"),
    "topk": dict(lora_layers="0-4", expert_num=4, expert_router="topk", top_k=2, type_router="none"),
    "adamole": dict(lora_layers="0-4", expert_num=3, expert_router="adamole", type_router="none"),
    "p_adapter": dict(p_adapter_layers="0-4", type_router="none"),
    "p_adapter_moe": dict(p_adapter_layers="0-4", expert_num=3, type_router="none"),
    "p_adapter_hydra": dict(p_adapter_layers="0-4", expert_num=3, p_adapter_hydra=True, type_router="none"),
    "prompt": dict(prompt_layers="0-4", type_router="none"),
    "prompt_moe": dict(prompt_layers="0-4", expert_num=2, type_router="none"),
    "soft_moa": dict(ALL, swi_x=4),
    "soft_moa_linear": dict(ALL, swi_x=0),
    "soft_moa_partial": dict(ALL, lora_layers="0-2", prompt_layers="1-3", p_adapter_layers="3-4"),
    "soft_moa_mixtures": dict(ALL, expert_num=2, hydra_moe=True, lb_loss_coeff=0.01),
    "sparse_moa": dict(ALL, swi_x=4, type_router="sparse"),
    "sparse_moa_ste": dict(ALL, type_router="sparse", threshold_ste=True),
    "sparse_moa_const": dict(ALL, type_router="sparse", const_threshold=True),
    "instance": dict(ALL, type_router="instance"),
    "unipeft": dict(ALL, type_router="unipeft"),
}


def bare_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**TINY))


def randomize_adapters(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.moa_adapter_names:
            p = model.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def moa_model(flags, seed=0, randomize=True):
    model = attach_adapters(bare_model(seed), MoAConfig(**flags))
    return randomize_adapters(model, seed) if randomize else model


def tokens(bsz=2, seqlen=12, seed=1):
    return torch.randint(0, TINY["vocab_size"], (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fresh_adapters_match_bare_logits_rel1e_5(name):
    toks = tokens()
    ref = bare_model()(toks)
    model = moa_model(CONFIGS[name], randomize=False)
    assert rel(model(toks), ref) <= 1e-5
    mask = torch.ones_like(toks, dtype=torch.bool)
    mask[0, 9:] = False
    assert rel(model(toks, token_mask=mask)[mask], bare_model()(toks, token_mask=mask)[mask]) <= 1e-5


def test_adapted_model_keeps_base_keys_and_loads_base_checkpoint_exact():
    bare = bare_model(seed=3)
    model = moa_model(CONFIGS["soft_moa"], seed=0)
    base_keys = set(bare.state_dict())
    assert base_keys <= set(model.state_dict())
    assert set(model.state_dict()) - base_keys == set(model.moa_adapter_names)
    missing, unexpected = model.load_state_dict(bare.state_dict(), strict=False)
    assert set(missing) == set(model.moa_adapter_names) and not unexpected
    assert torch.equal(model.layers[1].attention.wq.weight, bare.layers[1].attention.wq.weight)


def test_sparse_const_threshold0_equals_soft_moa_rel1e_5():
    soft = moa_model(CONFIGS["soft_moa"])
    sparse = moa_model(dict(CONFIGS["soft_moa"], type_router="sparse", const_threshold=True, max_threshold=0.0),
                       randomize=False)
    load_adapter_state_dict(sparse, adapter_state_dict(soft))
    toks = tokens()
    assert rel(sparse(toks), soft(toks)) <= 1e-5


def test_sparse_const_threshold1_equals_bare_model_rel1e_6_and_empty_experts_get_zero_grads():
    model = moa_model(dict(CONFIGS["soft_moa_mixtures"], type_router="sparse", const_threshold=True,
                           max_threshold=1.0))
    toks = tokens()
    with RouterStats(model) as stats:
        out = model(toks)
    assert all(v["active"] == 0.0 for layer in stats.summary().values() for v in layer.values())
    assert rel(out, bare_model()(toks)) <= 1e-6
    (out.pow(2).mean() + collect_aux_loss(model)).backward()
    # No token ran any expert, yet every adapter tensor is in the graph with a zero gradient (not
    # None), so DDP's reducer sees every parameter every step and cannot hang.
    for name in model.moa_adapter_names:
        grad = model.get_parameter(name).grad
        assert grad is not None, name
        if ".prompt." not in name:  # the prompt stays dense (its mixture router still feels the balance loss)
            assert not grad.any(), name


def densify(routes, bsz, seqlen):
    """Sparse routes -> dense masked weights (B, T, 1): zeros except the selected tokens' weights; the
    selected tokens are the mixtures' real rows (their load-balance statistics cover those only)."""
    dense = {}
    for slot, r in routes.items():
        if r.index is None:
            dense[slot] = r
        else:
            w = torch.zeros(bsz * seqlen, 1, dtype=r.weight.dtype).index_put((r.index,), r.weight)
            selected = torch.zeros(bsz * seqlen, dtype=torch.bool).index_fill(0, r.index, True)
            dense[slot] = Route(w.view(bsz, seqlen, 1), None, selected.view(bsz, seqlen))
    return dense


@pytest.mark.parametrize("ste, experts", [(False, 2), (True, 2), (False, 1), (True, 1)])
def test_sparse_gather_scatter_equals_dense_masked_forward_and_grads_rtol1e_5(ste, experts, monkeypatch):
    # experts 2: mixtures gather the selected rows of z; experts 1: plain LoRA and the single parallel
    # adapter run their rank-sized first stage on every token and the rest on the selected rows only.
    flags = dict(CONFIGS["sparse_moa"], threshold_ste=ste, expert_num=experts, lb_loss_coeff=0.1)
    toks = tokens(bsz=3, seqlen=16)
    mask = torch.ones_like(toks, dtype=torch.bool)
    mask[1, 11:] = False

    def run(model):
        out = model(toks, token_mask=mask)
        loss = (out[mask] ** 2).mean() + collect_aux_loss(model)
        loss.backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    sparse = moa_model(flags)
    with RouterStats(sparse) as stats:
        out_sparse, grads_sparse = run(sparse)
    active = [v["active"] for layer in stats.summary().values() for s, v in layer.items() if s != "prompt"]
    assert 0.2 < sum(active) / len(active) < 0.8  # a real selection, neither all nor nothing

    dense = moa_model(flags)
    real_forward = BlockRouter.forward
    monkeypatch.setattr(BlockRouter, "forward",
                        lambda self, x, *a: densify(real_forward(self, x, *a), x.shape[0], x.shape[1]))
    out_dense, grads_dense = run(dense)
    assert rel(out_sparse, out_dense) <= 1e-5
    for name, g in grads_dense.items():
        if g is None:
            assert grads_sparse[name] is None, name
        else:
            torch.testing.assert_close(grads_sparse[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item())
    thresholds = [n for n in grads_sparse if ".threshold." in n and "type_router" in n]
    assert thresholds and all((grads_sparse[n] is not None) == ste for n in thresholds)


def route_weights(model, toks, mask, start_pos=0):
    """{layer: (B, T, n_slots)} dense router weights of one forward (sparse: masked)."""
    captured = {}
    hooks = [blk.type_router.register_forward_hook(
        lambda mod, args, routes, i=i: captured.__setitem__(i, (mod.slots, routes)))
        for i, blk in enumerate(model.layers)]
    logits = model(toks, start_pos=start_pos, token_mask=mask)
    for h in hooks:
        h.remove()
    bsz, seqlen = toks.shape
    out = {}
    for i, (slots, routes) in captured.items():
        dense = densify(routes, bsz, seqlen)
        out[i] = torch.cat([dense[s].weight.expand(bsz, seqlen, 1) for s in slots], -1)
    return logits, out


@pytest.mark.parametrize("name", ["soft_moa", "sparse_moa", "instance", "unipeft", "soft_moa_mixtures"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pads_change_no_logit_router_weight_or_statistic_rel1e_5(name, side):
    model = moa_model(CONFIGS[name])
    alone = tokens(bsz=1, seqlen=10, seed=4)
    garbage = tokens(bsz=1, seqlen=5, seed=5)
    padded = torch.cat([alone, garbage] if side == "right" else [garbage, alone], 1)
    mask = torch.zeros_like(padded, dtype=torch.bool)
    real = slice(0, 10) if side == "right" else slice(5, 15)
    mask[:, real] = True
    with RouterStats(model) as stats_alone:
        logits_alone, w_alone = route_weights(model, alone, None)
    with RouterStats(model) as stats_padded:
        logits_padded, w_padded = route_weights(model, padded, mask)
    assert rel(logits_padded[:, real], logits_alone) <= 1e-5
    for i in w_alone:
        torch.testing.assert_close(w_padded[i][:, real], w_alone[i], rtol=1e-5, atol=1e-6)
        assert (w_padded[i][~mask] == 0).all() or name != "sparse_moa"  # a pad never runs a sparse expert
    for i, per_slot in stats_alone.summary().items():
        for slot, v in per_slot.items():
            assert stats_padded.summary()[i][slot]["tokens"] == 10
            assert abs(stats_padded.summary()[i][slot]["weight"] - v["weight"]) <= 1e-5
            assert abs(stats_padded.summary()[i][slot]["active"] - v["active"]) <= 1e-6


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_every_trainable_and_no_frozen_param_nonzero(name):
    model = moa_model(CONFIGS[name])
    toks = tokens(bsz=4, seqlen=24)
    ((model(toks) ** 2).mean() + collect_aux_loss(model)).backward()
    unused = {n for n in model.moa_adapter_names if ".threshold." in n} if model.moa_config.has_unused_params else set()
    for n, p in model.named_parameters():
        if not p.requires_grad or n in unused:
            assert p.grad is None, f"{n} should get no gradient"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
    assert unused or name != "sparse_moa"


def test_grad_checkpointing_same_grads_and_aux_loss_rtol1e_5():
    toks = tokens()
    results = []
    for ckpt in (False, True):
        model = moa_model(CONFIGS["soft_moa_mixtures"])
        model.grad_checkpointing = ckpt
        with RouterStats(model) as stats:
            out = model(toks)
            aux = collect_aux_loss(model)
            ((out ** 2).mean() + aux).backward()
        assert collect_aux_loss(model).item() == 0.0  # recomputation stored nothing new
        results.append((aux, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, stats.summary()))
    (aux0, g0, s0), (aux1, g1, s1) = results
    assert aux0.item() > 0 and abs(aux0.item() - aux1.item()) <= 1e-6
    assert s0 == s1  # the recomputed forward is not counted again
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["soft_moa", "sparse_moa", "soft_moa_mixtures", "lora"])
def test_kv_cache_decode_equals_full_forward_rel1e_5(name):
    model = moa_model(CONFIGS[name])
    toks = tokens(bsz=2, seqlen=9)
    with torch.inference_mode():
        full = model(toks)
        model.setup_caches(2, 16)
        prefill = model(toks[:, :7])
        step1 = model(toks[:, 7:8], start_pos=7)
        step2 = model(toks[:, 8:9], start_pos=8)
        model.clear_caches()
    assert rel(prefill, full[:, :7]) <= 1e-5
    assert rel(torch.cat([step1, step2], 1), full[:, 7:]) <= 1e-5


@pytest.mark.parametrize("name", ["instance", "unipeft"])
def test_instance_decode_reuses_prefill_weights_exact(name):
    model = moa_model(CONFIGS[name])
    toks = tokens(bsz=2, seqlen=8)
    with torch.inference_mode():
        model.setup_caches(2, 16)
        _, w_prefill = route_weights(model, toks[:, :7], None)
        _, w_decode = route_weights(model, toks[:, 7:8], None, start_pos=7)
        model.clear_caches()
        fresh = moa_model(CONFIGS[name])
        fresh.setup_caches(2, 16)
        with pytest.raises(ValueError, match="start_pos 0"):
            fresh(toks[:, 7:8], start_pos=7)
    for i in w_prefill:
        assert torch.equal(w_decode[i][:, 0], w_prefill[i][:, 0])


def test_instance_weight_is_mean_over_real_tokens_rel1e_6():
    model = moa_model(CONFIGS["instance"])
    router = model.layers[0].type_router
    x = torch.randn(2, 6, TINY["dim"])
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, False]])
    routes = router(x, mask)
    expected = torch.sigmoid(router._logits(torch.stack([x[0].mean(0), x[1, 2:5].mean(0)])))  # (B, n)
    for slot, j in router.col.items():
        assert rel(routes[slot].weight[:, 0, 0], expected[:, j]) <= 1e-6


def test_bf16_base_with_fp32_adapters_runs_and_keeps_dtypes_exact():
    toks = tokens(bsz=1, seqlen=4)
    bf16 = attach_adapters(bare_model().to(torch.bfloat16), MoAConfig(**CONFIGS["sparse_moa"]))
    randomize_adapters(bf16)
    assert all(bf16.get_parameter(n).dtype == torch.float32 for n in bf16.moa_adapter_names)
    out = bf16(toks)
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(bf16.get_parameter(n).grad.dtype == torch.float32 for n in bf16.moa_adapter_names
               if bf16.get_parameter(n).grad is not None)


@pytest.mark.parametrize("name", ["instance", "unipeft", "sparse_moa", "soft_moa_mixtures"])
def test_batched_generation_equals_each_prompt_alone_greedy_exact(name):
    """llama.generation left-pads and prefills in one chunk; per-sequence weights come from that prefill."""
    from llama.generation import generate

    model = moa_model(CONFIGS[name])
    prompts = [tokens(bsz=1, seqlen=7, seed=8)[0].tolist(), tokens(bsz=1, seqlen=3, seed=9)[0].tolist()]
    batched = generate(model, prompts, max_gen_len=5, stop_tokens=[])
    alone = [generate(model, [p], max_gen_len=5, stop_tokens=[])[0] for p in prompts]
    assert batched == alone and all(len(g) == 5 for g in batched)


def test_sparse_experts_run_only_on_selected_tokens_exact():
    """Real skipping: each skippable expert (LoRA sites, parallel adapter, their mixture routers) receives exactly
    the rows of the real tokens whose weight clears the threshold (gather), never all B*T rows times a zero."""
    model = moa_model(dict(CONFIGS["sparse_moa"], expert_num=2))
    toks = tokens(bsz=3, seqlen=16)
    mask = torch.ones_like(toks, dtype=torch.bool)
    mask[2, 10:] = False
    rows_seen, site_inputs, block_inputs = {}, {}, {}

    def spy(key, real_delta):
        def delta(z, row_mask=None, weight=None):
            rows_seen[key] = z.detach().clone()
            return real_delta(z, row_mask, weight)
        return delta

    def capture(store, key):
        return lambda mod, args: store.__setitem__(key, args[0].detach())

    for i, blk in enumerate(model.layers):
        blk.register_forward_pre_hook(capture(block_inputs, i))
        for slot, site in blk.moa_sites.items():
            if slot != "prompt":
                site.delta = spy((i, slot), site.delta)
                # the expert's own input: a LoRA site's projection input, the parallel adapter's FFN input
                (blk.feed_forward if slot == "p_adapter" else site).register_forward_pre_hook(
                    capture(site_inputs, (i, slot)))
    model(toks, token_mask=mask)
    assert len(rows_seen) == 4 * 6
    run = 0
    for (i, slot), rows in rows_seen.items():
        r, x = model.layers[i].type_router, block_inputs[i]
        with torch.no_grad():  # the selection from docs/method.md: sigmoid(SwiGLU(x)) > sigmoid(Linear(x)) * 0.5
            w = torch.sigmoid(r.w2(F.silu(r.w1(x)) * r.w3(x)))[..., r.slots.index(slot)]
            keep = (w > torch.sigmoid(r.threshold(x))[..., 0] * 0.5) & mask  # (B, T)
        assert torch.equal(rows, site_inputs[(i, slot)][keep]), (i, slot)
        run += rows.shape[0]
    assert 0.2 < run / (len(rows_seen) * toks.numel()) < 0.8  # a real selection, neither all nor nothing
