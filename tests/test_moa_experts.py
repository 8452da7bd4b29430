"""Each expert against a dense re-computation written here from the formulas of docs/method.md (fp32).

Tolerance: rtol 1e-5 (different summation order), unless the name says otherwise.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama import ModelArgs, Transformer
from llama.rope import apply_rotary_emb
from moa import MoAConfig, attach_adapters
from moa.method.experts import LoRALinear, ParallelAdapter, PromptExpert
from moa.method.routers import Route, routing

IN, OUT, N = 24, 40, 14


def close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def randomize(module, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and name not in ("weight", "bias"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def base_linear(seed=1):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=False)
    lin.weight.requires_grad_(False)
    return lin


def mixture_weights(logits, kind, k=2, thresh_logit=None):
    """softmax / top-k renormalised / AdaMoLE relu(p - sigmoid(.)/E) renormalised, row by row."""
    p = logits.softmax(-1)
    if kind == "soft":
        return p
    out = torch.zeros_like(p)
    for n in range(p.shape[0]):
        if kind == "topk":
            idx = sorted(range(p.shape[1]), key=lambda e: -p[n, e].item())[:k]
            for e in idx:
                out[n, e] = p[n, e] / sum(p[n, j] for j in idx)
        else:
            tau = torch.sigmoid(thresh_logit[n, 0]) / p.shape[1]
            kept = torch.clamp(p[n] - tau, min=0)
            out[n] = kept / kept.sum()
    return out


def test_fresh_lora_is_identity_exact():
    lin = base_linear()
    site = LoRALinear(lin, MoAConfig(lora_rank=4))
    x = torch.randn(2, 7, IN)
    assert torch.equal(site(x), lin(x))
    assert site.weight is lin.weight  # shared, not copied


def test_lora_matches_formula_fp32_rtol1e_5():
    lin = base_linear()
    cfg = MoAConfig(lora_rank=4, lora_alpha=12)
    site = randomize(LoRALinear(lin, cfg))
    x = torch.randn(2, 7, IN)
    ref = x @ lin.weight.T + (x @ site.lora_A.T @ site.lora_B.T) * (12 / 4)
    close(site(x), ref)
    w = torch.rand(2, 7, 1)
    with routing({site.slot: Route(weight=w)}):  # as its block hands it out
        close(site(x), x @ lin.weight.T + w * (x @ site.lora_A.T @ site.lora_B.T) * 3)


def test_molora_with_one_expert_equals_lora_rtol1e_6():
    lin = base_linear()
    cfg = MoAConfig(lora_rank=4, lora_alpha=8, expert_num=1)
    plain = randomize(LoRALinear(lin, cfg))
    mixed = LoRALinear(lin, cfg, mixture="molora")
    with torch.no_grad():
        mixed.lora_A.copy_(plain.lora_A[None])
        mixed.lora_B.copy_(plain.lora_B[None])
    x = torch.randn(3, 5, IN)
    close(mixed(x), plain(x), rtol=1e-6)


@pytest.mark.parametrize("kind", ["soft", "topk", "adamole"])
def test_molora_matches_formula_fp32_rtol1e_5(kind):
    e, r = 4, 3
    lin = base_linear()
    cfg = MoAConfig(lora_rank=r, lora_alpha=6, expert_num=e, expert_router=kind, top_k=2)
    site = randomize(LoRALinear(lin, cfg, mixture="molora"))
    z = torch.randn(N, IN)
    thr = None if kind != "adamole" else z @ site.router.threshold.weight.T + site.router.threshold.bias
    logits = z @ site.router.proj.weight.T + (0 if site.router.proj.bias is None else site.router.proj.bias)
    assert (site.router.proj.bias is not None) == (kind != "soft")  # top-k/AdaMoLE routers have a bias
    p = mixture_weights(logits, kind, 2, thr)
    delta = sum(p[:, i:i + 1] * (z @ site.lora_A[i].T @ site.lora_B[i].T) for i in range(e)) * (6 / r)
    close(site(z), z @ lin.weight.T + delta)


@pytest.mark.parametrize("kind", ["soft", "topk", "adamole"])
def test_hydralora_matches_formula_fp32_rtol1e_5(kind):
    e, r = 3, 4
    lin = base_linear()
    cfg = MoAConfig(lora_rank=r, lora_alpha=4, expert_num=e, hydra_moe=True, expert_router=kind, top_k=2)
    site = randomize(LoRALinear(lin, cfg, mixture="hydra"))
    assert site.lora_A.shape == (r, IN) and site.lora_B.shape == (e, OUT, r)
    z = torch.randn(N, IN)
    thr = None if kind != "adamole" else z @ site.router.threshold.weight.T + site.router.threshold.bias
    logits = z @ site.router.proj.weight.T + (0 if site.router.proj.bias is None else site.router.proj.bias)
    p = mixture_weights(logits, kind, 2, thr)
    delta = sum(p[:, i:i + 1] * (z @ site.lora_A.T @ site.lora_B[i].T) for i in range(e))
    close(site(z), z @ lin.weight.T + delta)


def test_topk_keeps_exactly_k_experts_exact():
    cfg = MoAConfig(lora_rank=2, expert_num=5, expert_router="topk", top_k=2)
    site = randomize(LoRALinear(base_linear(), cfg, mixture="molora"))
    w = site.router(torch.randn(N, IN))
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(N))


@pytest.mark.parametrize("variant", ["single", "moe", "hydra"])
def test_parallel_adapter_matches_formula_fp32_rtol1e_5(variant):
    dim, size, e = 32, 6, (1 if variant == "single" else 3)
    cfg = MoAConfig(p_adapter_size=size, expert_num=e, p_adapter_hydra=variant == "hydra")
    pa = randomize(ParallelAdapter(dim, cfg, torch.device("cpu")))
    u = torch.randn(N, dim)
    w = torch.rand(N, 1)
    if variant == "single":
        ref = F.silu(u @ pa.down.T + pa.down_bias) @ pa.up.T + pa.up_bias
    else:
        p = (u @ pa.router.proj.weight.T + pa.router.proj.bias).softmax(-1)
        ref = 0
        for i in range(e):
            down, down_b = (pa.down, pa.down_bias) if variant == "hydra" else (pa.down[i], pa.down_bias[i])
            ref = ref + p[:, i:i + 1] * (F.silu(u @ down.T + down_b) @ pa.up[i].T + pa.up_bias[i])
    close(pa.delta(u), ref)
    close(pa.delta(u, weight=w), w * ref)


def test_fresh_parallel_adapter_is_below_1e_6_of_input_scale():
    pa = ParallelAdapter(64, MoAConfig(p_adapter_size=16), torch.device("cpu"))
    assert pa.delta(torch.randn(N, 64)).abs().max() < 1e-6  # Xavier gain 1e-4, zero biases


def prompt_reference(x, q, wk, wv, pe, route_w=None):
    """Per head: one softmax(q . k_p / sqrt(hd)) over all E*L prompt positions, each set's part weighed
    by the prompt router, times gate."""
    bsz, heads, seqlen, hd = q.shape
    kv = pe.n_kv_heads
    vec = pe.vectors.reshape(pe.n_experts, pe.prompt_len, -1)
    if pe.n_experts > 1:
        mix = (x @ pe.router.proj.weight.T + pe.router.proj.bias).softmax(-1)  # (B, T, E)
    out = torch.zeros(bsz, seqlen, heads, hd)
    for h in range(heads):
        g = h // (heads // kv)  # the kv head that query head h shares (GQA)
        ks = [(vec[e] @ wk.T).view(-1, kv, hd)[:, g] for e in range(pe.n_experts)]  # each (L, hd)
        scores = torch.cat([q[:, h] @ k.T / math.sqrt(hd) for k in ks], -1)  # (B, T, E*L)
        joint = scores.softmax(-1).split(pe.prompt_len, -1)  # one softmax over all sets, split per set
        for e in range(pe.n_experts):
            v = (vec[e] @ wv.T).view(-1, kv, hd)[:, g]
            att = joint[e] @ v  # (B, T, hd)
            m = mix[..., e:e + 1] if pe.n_experts > 1 else 1.0
            out[:, :, h] += m * att * pe.gate[0, h, 0, 0]
    out = out.reshape(bsz, seqlen, heads * hd)
    return out if route_w is None else out * route_w


@pytest.mark.parametrize("n_experts", [1, 3])
def test_prompt_attention_matches_per_head_formula_gqa_fp32_rtol1e_5(n_experts):
    dim, heads, kv, bsz, seqlen = 32, 4, 2, 2, 5
    cfg = MoAConfig(prompt_len=3, expert_num=n_experts)
    pe = randomize(PromptExpert(dim, heads, kv, cfg, torch.device("cpu")))
    wk, wv = nn.Linear(dim, kv * 8, bias=False), nn.Linear(dim, kv * 8, bias=False)
    x, q = torch.randn(bsz, seqlen, dim), torch.randn(bsz, heads, seqlen, dim // heads)
    w = torch.rand(bsz, seqlen, 1)
    close(pe(x, q, wk, wv), prompt_reference(x, q, wk.weight, wv.weight, pe))
    with routing({pe.slot: Route(weight=w)}):
        close(pe(x, q, wk, wv), prompt_reference(x, q, wk.weight, wv.weight, pe, w))


def test_prompt_block_adds_before_wo_matches_manual_block_fp32_rtol1e_5():
    """A whole block with prompt + LoRA on Q and O (type router none) against llama pieces + formulas."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16))
    attach_adapters(model, MoAConfig(lora_layers="0-1", lora_targets="Q,O", prompt_layers="0-1", prompt_len=3,
                                     type_router="none"))
    randomize(model)
    block, attn = model.layers[0], model.layers[0].attention
    tokens = torch.randint(0, 16, (2, 6))
    meta = model._meta(tokens, 0, None)
    x = model.tok_embeddings(tokens)
    xn = block.attention_norm(x)
    lora = lambda site, z: z @ site.weight.T + z @ site.lora_A.T @ site.lora_B.T * site.scale  # noqa: E731
    q = apply_rotary_emb(lora(attn.wq, xn).view(2, 6, 4, 8), meta.rope).transpose(1, 2)
    k = apply_rotary_emb(attn.wk(xn).view(2, 6, 2, 8), meta.rope).transpose(1, 2)
    v = attn.wv(xn).view(2, 6, 2, 8).transpose(1, 2)
    base = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          is_causal=True).transpose(1, 2).flatten(2)
    h = x + lora(attn.wo, base + prompt_reference(xn, q, attn.wk.weight, attn.wv.weight, attn.prompt))
    ref = h + block.feed_forward(block.ffn_norm(h))
    close(block(x, meta), ref)


def type_router_reference(x, router, mode, max_threshold=0.5):
    """Per-slot weights (B, T|1, 1) of docs/method.md's type routers, from the router's tensors, in slot order."""
    lin = lambda m, z: z @ m.weight.T + m.bias  # noqa: E731
    logits = ((lambda z: lin(router.proj, z)) if hasattr(router, "proj")
              else (lambda z: lin(router.w2, F.silu(lin(router.w1, z)) * lin(router.w3, z))))
    if mode in ("soft", "sparse"):
        w = torch.sigmoid(logits(x))  # (B, T, n)
    elif mode == "instance":
        w = torch.sigmoid(logits(x.mean(1, keepdim=True)))  # (B, 1, n)
    else:  # unipeft: one gate for every LoRA site, one for the prompt, one for the parallel adapter
        pooled = x.mean(1, keepdim=True)
        gate = {g: torch.sigmoid(lin(router.gates[g], pooled)) for g in ("lora", "prompt", "p_adapter")}
        w = torch.cat([gate["lora" if s.startswith("lora.") else s] for s in router.slots], -1)
    if mode == "sparse":
        t = torch.sigmoid(lin(router.threshold, x)) * max_threshold  # (B, T, 1)
        w = w * (w > t)
    return {s: w[..., j:j + 1] for j, s in enumerate(router.slots)}


@pytest.mark.parametrize("mode,swi_x", [("soft", 4), ("soft", 0), ("sparse", 4), ("instance", 0), ("unipeft", 0)])
def test_moa_block_seven_types_matches_manual_block_fp32_rtol1e_5(mode, swi_x):
    """One block with Soft MoA's 7 types under each type router against llama pieces + docs/method.md formulas:
    every type's output times its token's (or sequence's) weight; sparse through the gather/scatter path."""
    torch.manual_seed(0)
    dim, heads, kv, bsz, seqlen = 32, 4, 2, 2, 9
    model = Transformer(ModelArgs(dim=dim, n_layers=1, n_heads=heads, n_kv_heads=kv, vocab_size=16, multiple_of=16))
    attach_adapters(model, MoAConfig(lora_layers="0-1", lora_rank=3, lora_alpha=6, prompt_layers="0-1",
                                     prompt_len=3, p_adapter_layers="0-1", p_adapter_size=5, swi_x=swi_x,
                                     type_router=mode))
    randomize(model, std=0.4)
    block, attn, ffn = model.layers[0], model.layers[0].attention, model.layers[0].feed_forward
    router = block.type_router
    assert router.slots == ("lora.wq", "lora.wk", "lora.wv", "lora.wo", "lora.w2", "prompt", "p_adapter")
    tokens = torch.randint(0, 16, (bsz, seqlen))
    meta = model._meta(tokens, 0, None)
    x = torch.randn(bsz, seqlen, dim)
    with torch.no_grad():
        w = type_router_reference(x, router, mode)
    if mode == "sparse":
        kept = torch.cat([w[s] > 0 for s in router.slots], -1).float().mean().item()
        assert 0.1 < kept < 0.9  # a real selection
    lora = lambda site, z, slot: z @ site.weight.T + w[slot] * (z @ site.lora_A.T @ site.lora_B.T) * 2  # noqa: E731
    xn = block.attention_norm(x)
    q = apply_rotary_emb(lora(attn.wq, xn, "lora.wq").view(bsz, seqlen, heads, 8), meta.rope)
    k = apply_rotary_emb(lora(attn.wk, xn, "lora.wk").view(bsz, seqlen, kv, 8), meta.rope)
    v = lora(attn.wv, xn, "lora.wv").view(bsz, seqlen, kv, 8)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1)
    base = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
    prompt = prompt_reference(xn, q, attn.wk.weight, attn.wv.weight, attn.prompt, w["prompt"].expand(-1, seqlen, -1))
    h = x + lora(attn.wo, base + prompt, "lora.wo")
    u = block.ffn_norm(h)
    pa = ffn.p_adapter
    adapter = F.silu(u @ pa.down.T + pa.down_bias) @ pa.up.T + pa.up_bias
    ref = h + lora(ffn.w2, F.silu(u @ ffn.w1.weight.T) * (u @ ffn.w3.weight.T), "lora.w2") + w["p_adapter"] * adapter
    close(block(x, meta), ref)


def test_initialisation_follows_design_exact():
    """docs/method.md: A Kaiming-uniform (|A| <= 1/sqrt(in)), B zero; parallel adapter Xavier-uniform gain 1e-4, biases
    zero; prompt gate zero; every router bias zero."""
    torch.manual_seed(0)
    dim = 48
    model = Transformer(ModelArgs(dim=dim, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16))
    attach_adapters(model, MoAConfig(lora_layers="0-1", expert_num=3, prompt_layers="0-1", p_adapter_layers="0-1",
                                     p_adapter_size=6, swi_x=4, type_router="sparse", expert_router="adamole"))
    attn, pa = model.layers[0].attention, model.layers[0].feed_forward.p_adapter
    for site in (attn.wq, attn.wo, model.layers[0].feed_forward.w2):
        bound = 1 / math.sqrt(site.in_features)
        assert site.lora_A.abs().max() <= bound and site.lora_A.abs().max() > 0.9 * bound  # uniform, full range
        assert not site.lora_B.any()
    xavier = 1e-4 * math.sqrt(6 / (dim + 6))
    for t in (pa.down, pa.up):
        assert t.abs().max() <= xavier and t.abs().max() > 0.9 * xavier
    assert not pa.down_bias.any() and not pa.up_bias.any()
    assert not attn.prompt.gate.any() and attn.prompt.gate.shape == (1, 4, 1, 1)
    biases = [n for n in model.moa_adapter_names if n.endswith(".bias") and "router" in n]
    assert biases and not any(model.get_parameter(n).any() for n in biases)
