"""Import of the official MoA code's checkpoints (moa.files.official, scripts/import_official.py).

The official-format state dicts are built here from the names and shapes of MoA's official code (the name
table of moa.files.official; random values); after conversion and a strict load into a tiny random model,
the logits are checked (fp32, rel <= 1e-5) against `reference_logits`: a forward written from the
formulas of docs/method.md that reads the OFFICIAL tensors by their official names (the type router's weight
of type t is the official output row of t in the official type order), never our converted ones.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from llama.rope import rope_inv_freq
from moa import MoAConfig, attach_adapters, load_adapter, save_adapter
from moa.files.official import FormatError, import_official
from tests.helpers import TINY_PARAMS, random_state_dict, rel

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ModelArgs(**TINY_PARAMS)
DIM, HD, H, KV, HID = ARGS.dim, ARGS.head_dim, ARGS.n_heads, ARGS.n_kv_heads, ARGS.ffn_hidden_dim
# Official site name -> (in, out) of its projection in the tiny model.
SITES = {"attention.lora_Q": (DIM, H * HD), "attention.lora_K": (DIM, KV * HD), "attention.lora_V": (DIM, KV * HD),
         "attention.lora_O": (H * HD, DIM), "feed_forward.lora_GATE": (DIM, HID), "feed_forward.lora_UP": (DIM, HID),
         "feed_forward.lora_DOWN": (HID, DIM)}
SHORT = {"Q": "attention.lora_Q", "K": "attention.lora_K", "V": "attention.lora_V", "O": "attention.lora_O",
         "GATE": "feed_forward.lora_GATE", "UP": "feed_forward.lora_UP", "DOWN": "feed_forward.lora_DOWN"}
# The official type router's output order.
OFFICIAL_ORDER = ("Q", "K", "V", "prompt", "O", "UP", "GATE", "DOWN", "p_adapter")
RANK, PLEN = 4, 3


# ---- official-format tensors ------------------------------------------------------------------------
def _lin(g: torch.Generator, out: int, inp: int, scale: float, bias: bool = True) -> dict[str, torch.Tensor]:
    t = {"weight": torch.randn(out, inp, generator=g) * scale}
    if bias:
        t["bias"] = torch.randn(out, generator=g) * scale
    return t


def _put(sd: dict, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    sd.update({f"{prefix}.{k}": v for k, v in tensors.items()})


def official_site(sd: dict, g: torch.Generator, p: str, site: str, kind: str, e: int, noisy: bool = False) -> None:
    """One official LoRA site `p + site` of `kind`: lora | molora | hydra | topk | adamole."""
    din, dout = SITES[site]
    q = p + site
    a = lambda: torch.randn(RANK, din, generator=g) / math.sqrt(din)  # noqa: E731
    b = lambda: torch.randn(dout, RANK, generator=g) * 0.3  # noqa: E731
    if kind == "lora":
        sd.update({f"{q}.lora_A.weight": a(), f"{q}.lora_B.weight": b()})
    elif kind in ("molora", "hydra"):
        if kind == "hydra":
            sd[f"{q}.lora_A.weight"] = a()
        for j in range(e):
            if kind == "molora":
                sd[f"{q}.lora_A_l.{j}.weight"] = a()
            sd[f"{q}.lora_B_l.{j}.weight"] = b()
        sd[f"{q}.router.weight"] = torch.randn(e, din, generator=g) * 0.5
    else:
        for j in range(e):
            sd.update({f"{q}.experts.{j}.lora_A.weight": a(), f"{q}.experts.{j}.lora_B.weight": b()})
        if kind == "topk":
            _put(sd, f"{q}.router.topkroute_linear", _lin(g, e, din, 0.5))
            if noisy:
                _put(sd, f"{q}.router.noise_linear", _lin(g, e, din, 0.5))
        else:
            _put(sd, f"{q}.router", _lin(g, e, din, 0.5))
            _put(sd, f"{q}.threshold_fn", _lin(g, 1, din, 0.5))
            if noisy:
                _put(sd, f"{q}.noise_linear", _lin(g, e, din, 0.5))


def official_prompt(sd: dict, g: torch.Generator, p: str, e: int) -> None:
    sd[p + "attention.prompt.weight"] = torch.randn(e * PLEN, DIM, generator=g)
    sd[p + "attention.prompt_gate"] = torch.randn(1, H, 1, 1, generator=g) * 0.5
    if e > 1:
        _put(sd, p + "attention.prompt_router", _lin(g, e, DIM, 0.5))


def official_p_adapter(sd: dict, g: torch.Generator, p: str, e: int, hydra: bool, size: int = 8) -> None:
    q = p + "p_adapter."
    if e == 1 or hydra:
        _put(sd, q + "down_proj", _lin(g, size, DIM, 0.3))
    else:
        for j in range(e):
            _put(sd, f"{q}down_proj_l.{j}", _lin(g, size, DIM, 0.3))
    if e == 1:
        _put(sd, q + "up_proj", _lin(g, DIM, size, 0.3))
    else:
        for j in range(e):
            _put(sd, f"{q}up_proj_l.{j}", _lin(g, DIM, size, 0.3))
        _put(sd, q + "router", _lin(g, e, DIM, 0.5))


def official_type_router(sd: dict, g: torch.Generator, p: str, n_types: int, swi_x: int, sparse: bool) -> None:
    if swi_x == 0:
        _put(sd, p + "adapter_type_router", _lin(g, n_types, DIM, 0.5))
    else:
        for name, (o, i) in {"w1": (swi_x * n_types, DIM), "w3": (swi_x * n_types, DIM),
                             "w2": (n_types, swi_x * n_types)}.items():
            _put(sd, f"{p}adapter_type_router.{name}", _lin(g, o, i, 0.5))
    _put(sd, p + "adapter_noise_linear", _lin(g, n_types, DIM, 0.1))  # unused by the official forward
    if sparse:
        _put(sd, p + "adapter_threshold_fn", _lin(g, 1, DIM, 0.5))


def build_official(case: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official adapter tensors of `case` for the tiny 2-layer model (names without the `llama.` prefix)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(ARGS.n_layers):
        p = f"layers.{i}."
        sites = case.get("lora", {}).get(i, ())
        for short in sites:
            official_site(sd, g, p, SHORT[short], case.get("kind", "lora"), case.get("E", 1), case.get("noisy", False))
        prompt = i in case.get("prompt", ())
        if prompt:
            official_prompt(sd, g, p, case.get("E", 1))
        pa = i in case.get("p_adapter", ())
        if pa:
            official_p_adapter(sd, g, p, case.get("E", 1), case.get("hydra_pa", False))
        n_types = len(sites) + prompt + pa
        if case.get("router") in ("soft", "sparse") and n_types:
            official_type_router(sd, g, p, n_types, case.get("swi_x", 0), case["router"] == "sparse")
        if case.get("router") == "unipeft" and n_types:
            _put(sd, p + "lora_gate", _lin(g, 1, DIM, 0.5))
            _put(sd, p + "prompt_gate", _lin(g, 1, DIM, 0.5))
    return sd


# ---- the reference forward, from the formulas, on the official tensors ----------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ARGS.norm_eps) * w


def _linear(off: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, off[name + ".weight"], off.get(name + ".bias"))


def _renorm(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(-1, keepdim=True)


def expert_weights(off: dict, q: str, z: torch.Tensor, case: dict) -> torch.Tensor:
    """(..., E) weights of the mixture at official site `q` for input z."""
    kind, e = case["kind"], case["E"]
    if kind in ("molora", "hydra"):
        return F.softmax(z @ off[q + ".router.weight"].T, -1)
    if kind == "topk":
        p = F.softmax(_linear(off, q + ".router.topkroute_linear", z), -1)
        top, idx = p.topk(case["top_k"], -1)
        return torch.zeros_like(p).scatter(-1, idx, _renorm(top))
    p = F.softmax(_linear(off, q + ".router", z), -1)  # AdaMoLE
    a = p - torch.sigmoid(_linear(off, q + ".threshold_fn", z)) / e
    return _renorm(a * (a >= 0))


def lora_delta(off: dict, q: str, z: torch.Tensor, case: dict) -> torch.Tensor:
    """The official site `q`'s LoRA output on z, times alpha / r."""
    scale, e, kind = case["alpha"] / RANK, case.get("E", 1), case.get("kind", "lora")
    if kind == "lora":
        return z @ off[q + ".lora_A.weight"].T @ off[q + ".lora_B.weight"].T * scale
    w = expert_weights(off, q, z, case)
    out = 0
    for j in range(e):
        a = {"molora": f"{q}.lora_A_l.{j}.weight", "hydra": f"{q}.lora_A.weight"}.get(
            kind, f"{q}.experts.{j}.lora_A.weight")
        b = f"{q}.lora_B_l.{j}.weight" if kind in ("molora", "hydra") else f"{q}.experts.{j}.lora_B.weight"
        out = out + w[..., j:j + 1] * (z @ off[a].T @ off[b].T)
    return out * scale


def type_weights(off: dict, p: str, x: torch.Tensor, types: list[str], case: dict) -> dict[str, torch.Tensor]:
    """{official type name: weight (B, T|1, 1)}; the weight of type t read from the official row of t."""
    router = case.get("router", "none")
    if router == "none" or not types:
        return {t: torch.ones(()) for t in types}
    if router == "unipeft":
        pooled = x.mean(1, keepdim=True)
        lg = torch.sigmoid(_linear(off, p + "lora_gate", pooled))
        pg = torch.sigmoid(_linear(off, p + "prompt_gate", pooled))  # also the adapter's gate, as the official
        return {t: pg if t in ("prompt", "p_adapter") else lg for t in types}
    order = [t for t in OFFICIAL_ORDER if t in types]
    q = p + "adapter_type_router"
    if case.get("swi_x", 0) == 0:
        logits = _linear(off, q, x)
    else:
        logits = _linear(off, q + ".w2", F.silu(_linear(off, q + ".w1", x)) * _linear(off, q + ".w3", x))
    w = torch.sigmoid(logits)
    if router == "sparse":
        w = w * (w >= torch.sigmoid(_linear(off, p + "adapter_threshold_fn", x)) * case["max_threshold"])
    return {t: w[..., order.index(t):order.index(t) + 1] for t in types}


def prompt_out(off: dict, p: str, xn: torch.Tensor, q: torch.Tensor, base: dict, e: int) -> torch.Tensor:
    """Attention of the RoPE'd q (B, H, T, hd) to the official prompt rows: (B, T, H*hd), gated."""
    rows = off[p + "attention.prompt.weight"]  # (E*L, dim), set-major
    k = (rows @ base[p + "attention.wk.weight"].T).view(-1, KV, HD).repeat_interleave(H // KV, 1)  # (EL, H, hd)
    v = (rows @ base[p + "attention.wv.weight"].T).view(-1, KV, HD).repeat_interleave(H // KV, 1)
    a = F.softmax(torch.einsum("bhtd,lhd->bhtl", q, k) / math.sqrt(HD), -1)  # jointly over all E*L rows
    parts = torch.einsum("bhtl,lhd->bthld", a, v).unflatten(3, (e, PLEN)).sum(4)  # (B, T, H, E, hd)
    if e > 1:
        r = F.softmax(_linear(off, p + "attention.prompt_router", xn), -1)  # (B, T, E)
        out = (parts * r[:, :, None, :, None]).sum(3)
    else:
        out = parts[:, :, :, 0]
    return (out * off[p + "attention.prompt_gate"].view(1, 1, H, 1)).flatten(2)


def p_adapter_out(off: dict, p: str, u: torch.Tensor, e: int, hydra: bool) -> torch.Tensor:
    q = p + "p_adapter."
    if e == 1:
        return _linear(off, q + "up_proj", F.silu(_linear(off, q + "down_proj", u)))
    r = F.softmax(_linear(off, q + "router", u), -1)
    out = 0
    for j in range(e):
        h = F.silu(_linear(off, q + ("down_proj" if hydra else f"down_proj_l.{j}"), u))
        out = out + r[..., j:j + 1] * _linear(off, f"{q}up_proj_l.{j}", h)
    return out


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta's RoPE in real arithmetic: pair (x[2i], x[2i+1]) of x (B, T, H, hd) turned by the angle
    with cos/sin (B, T, hd/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def reference_block(base: dict, off: dict, i: int, x: torch.Tensor, case: dict, cos, sin) -> torch.Tensor:
    p = f"layers.{i}."
    sites = [s for s in SHORT if any(k.startswith(p + SHORT[s] + ".") for k in off)]
    prompt, pa = p + "attention.prompt.weight" in off, any(k.startswith(p + "p_adapter.") for k in off)
    gw = type_weights(off, p, x, sites + ["prompt"] * prompt + ["p_adapter"] * pa, case)

    def proj(name: str, site: str, z: torch.Tensor) -> torch.Tensor:
        out = z @ base[p + name + ".weight"].T
        return out + gw[site] * lora_delta(off, p + SHORT[site], z, case) if site in sites else out

    bsz, t, _ = x.shape
    xn = _rms(x, base[p + "attention_norm.weight"])
    q = rotate_pairs(proj("attention.wq", "Q", xn).view(bsz, t, H, HD), cos, sin).transpose(1, 2)
    k = rotate_pairs(proj("attention.wk", "K", xn).view(bsz, t, KV, HD), cos, sin).transpose(1, 2)
    v = proj("attention.wv", "V", xn).view(bsz, t, KV, HD).transpose(1, 2)
    k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    att = F.softmax((q @ k.transpose(-1, -2) / math.sqrt(HD)).masked_fill(~causal, float("-inf")), -1)
    out = (att @ v).transpose(1, 2).flatten(2)
    if prompt:
        out = out + gw["prompt"] * prompt_out(off, p, xn, q, base, case.get("E", 1))
    h = x + proj("attention.wo", "O", out)
    u = _rms(h, base[p + "ffn_norm.weight"])
    inner = F.silu(proj("feed_forward.w1", "GATE", u)) * proj("feed_forward.w3", "UP", u)
    h = h + proj("feed_forward.w2", "DOWN", inner)
    if pa:
        h = h + gw["p_adapter"] * p_adapter_out(off, p, u, case.get("E", 1), case.get("hydra_pa", False))
    return h


def reference_logits(base: dict, off: dict, tokens: torch.Tensor, case: dict) -> torch.Tensor:
    """Logits (B, T, vocab) of the base with the official adapters, from the formulas."""
    angles = torch.arange(tokens.shape[1]).float()[:, None] * rope_inv_freq(ARGS)
    cos, sin = angles.cos()[None], angles.sin()[None]
    h = base["tok_embeddings.weight"][tokens]
    for i in range(ARGS.n_layers):
        h = reference_block(base, off, i, h, case, cos, sin)
    return _rms(h, base["norm.weight"]) @ base["output.weight"].T


# ---- the cases -------------------------------------------------------------------------------------------
BOTH = {0: ("Q", "K", "V", "O", "DOWN"), 1: ("Q", "K", "V", "O", "DOWN")}
ALL_SITES = ("Q", "K", "V", "O", "GATE", "UP", "DOWN")
CASES = {
    "lora": dict(lora=BOTH),
    "molora": dict(lora={0: ("Q", "V", "GATE", "UP", "DOWN"), 1: ("Q", "V", "GATE", "UP", "DOWN")},
                   kind="molora", E=3),
    "hydralora": dict(lora=BOTH, kind="hydra", E=3),
    "topk": dict(lora=BOTH, kind="topk", E=4, top_k=2),
    "topk_noisy": dict(lora={0: ("Q", "V"), 1: ("Q", "V")}, kind="topk", E=3, top_k=2, noisy=True),
    "adamole": dict(lora=BOTH, kind="adamole", E=3),
    "adamole_noisy": dict(lora={0: ("Q", "DOWN"), 1: ("Q", "DOWN")}, kind="adamole", E=3, noisy=True),
    "prompt": dict(prompt=(0, 1)),
    "prompt_mixture": dict(prompt=(0, 1), E=2),
    "p_adapter": dict(p_adapter=(0, 1)),
    "p_adapter_hydra": dict(p_adapter=(0, 1), E=3, hydra_pa=True),
    "p_adapter_moe": dict(p_adapter=(0, 1), E=3),
    # per-block type sets differ: block 0 has LoRA + p_adapter, block 1 LoRA + prompt
    "soft_moa_linear": dict(lora={0: ALL_SITES, 1: ALL_SITES}, prompt=(1,), p_adapter=(0,), router="soft"),
    "soft_moa_swiglu": dict(lora={0: ALL_SITES, 1: ALL_SITES}, prompt=(0, 1), p_adapter=(0, 1), router="soft",
                            swi_x=2),
    "sparse_moa": dict(lora=BOTH, prompt=(0, 1), p_adapter=(0, 1), router="sparse", swi_x=2, max_threshold=0.5),
    # block 1 has LoRA only: the official still keeps its prompt_gate, which nothing reads
    "unipeft": dict(lora={0: ("Q", "V"), 1: ("Q", "V")}, prompt=(0,), p_adapter=(0,), router="unipeft"),
}
for _case in CASES.values():
    _case.setdefault("alpha", 16.0)


def run_args(case: dict) -> argparse.Namespace:
    """The official run's args: flags our names share (alpha, top_k, max_threshold) and some we ignore."""
    return argparse.Namespace(lora_alpha=case["alpha"], top_k=case.get("top_k", 2),
                              max_threshold=case.get("max_threshold", 0.5), batch_size=4, lr=1e-3,
                              data_path="/data/x.json", llama_type="llama3_1_8B")


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return random_state_dict(TINY_PARAMS, seed=3)


def loaded_logits(base_sd: dict, adapter: pathlib.Path, tokens: torch.Tensor) -> torch.Tensor:
    model = Transformer(ARGS)
    model.load_state_dict(base_sd)
    load_adapter(model, adapter)  # attaches from adapter_params.json, loads strictly
    with torch.no_grad():
        return model.eval()(tokens)


TOKENS = torch.randint(0, TINY_PARAMS["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", list(CASES))
def test_official_checkpoint_converts_and_matches_formulas_on_official_tensors_rel1e_5(name, base_sd, tmp_path):
    case = CASES[name]
    off = build_official(case)
    ckpt = tmp_path / "checkpoint-1.pth"
    model = {**{f"llama.{k}": v for k, v in base_sd.items()}, **{f"llama.{k}": v for k, v in off.items()}}
    torch.save({"model": model, "args": run_args(case), "epoch": 1}, ckpt)
    adapter = import_official(ckpt, tmp_path / "out", log=lambda s: None)
    logits = loaded_logits(base_sd, adapter, TOKENS)
    with torch.no_grad():
        ref = reference_logits(base_sd, off, TOKENS, case)
    assert rel(logits, ref) <= 1e-5
    bare = reference_logits(base_sd, {}, TOKENS, {})
    assert rel(logits, bare) > 1e-3  # the adapters do act


def test_type_router_rows_follow_official_type_names(base_sd, tmp_path):
    """Block 1 of soft_moa_linear: our row of slot s is the official row of s's official type name."""
    off = build_official(CASES["soft_moa_linear"])
    ckpt = tmp_path / "adapter.pth"
    torch.save(off, ckpt)
    adapter = import_official(ckpt, tmp_path / "out", flags="--lora_alpha 16", log=lambda s: None)
    ours = torch.load(adapter, weights_only=True)
    official = ("Q", "K", "V", "prompt", "O", "UP", "GATE", "DOWN")  # types of block 1, official order
    slot_type = {"lora.wq": "Q", "lora.wk": "K", "lora.wv": "V", "lora.wo": "O", "lora.w1": "GATE", "lora.w3": "UP",
                 "lora.w2": "DOWN", "prompt": "prompt"}
    model = attach_adapters(Transformer(ARGS), MoAConfig(lora_layers="0-2", lora_targets="Q,K,V,O,FFN_GATE,FFN_UP,"
                                                         "FFN_DOWN", prompt_layers="1-2", prompt_len=PLEN,
                                                         p_adapter_layers="0-1", p_adapter_size=8))
    slots = model.layers[1].type_router.slots
    for j, slot in enumerate(slots):
        row = off["layers.1.adapter_type_router.weight"][official.index(slot_type[slot])]
        assert torch.equal(ours["layers.1.type_router.proj.weight"][j], row), slot


@pytest.mark.parametrize("how", ["flags", "args_from"])
def test_bare_adapter_with_flags_or_args_from(how, base_sd, tmp_path, tiny_model_dir):
    case = CASES["topk"]
    off = build_official(case)
    bare = tmp_path / "adapter.pth"
    torch.save({f"llama.{k}": v for k, v in off.items()}, bare)
    ckpt = tmp_path / "checkpoint-2.pth"
    torch.save({"model": {"llama.tok_embeddings.weight": base_sd["tok_embeddings.weight"]},
                "args": run_args(case)}, ckpt)
    kw = dict(flags="--lora_alpha 16 --top_k 2") if how == "flags" else dict(args_path=str(ckpt))
    adapter = import_official(bare, tmp_path / "out", llama_path=str(tiny_model_dir) if how == "flags" else None,
                              log=lambda s: None, **kw)
    with torch.no_grad():
        assert rel(loaded_logits(base_sd, adapter, TOKENS), reference_logits(base_sd, off, TOKENS, case)) <= 1e-5


def test_missing_alpha_is_reported_as_our_default(tmp_path):
    off = build_official(CASES["lora"])
    torch.save(off, tmp_path / "adapter.pth")
    notes: list[str] = []
    import_official(tmp_path / "adapter.pth", tmp_path / "out", log=notes.append)
    assert any("--lora_alpha 8.0 (our default" in n for n in notes)
    assert MoAConfig.from_json(str(tmp_path / "out" / "adapter_params.json")).lora_alpha == 8.0


# ---- clear errors ----------------------------------------------------------------------------------------
def test_neither_ours_nor_official_is_a_clear_error(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(FormatError, match=r"x\.pth: neither an official MoA checkpoint nor ours.*encoder\.layer"):
        import_official(path, tmp_path / "out", log=lambda s: None)


def test_one_of_ours_says_use_load_adapter(tmp_path):
    model = attach_adapters(Transformer(ARGS), MoAConfig(lora_layers="0-2", type_router="none"))
    save_adapter(model, tmp_path / "ours" / "adapter.pth")
    with pytest.raises(FormatError, match=r"already in this project's format .*moa\.load_adapter"):
        import_official(tmp_path / "ours" / "adapter.pth", tmp_path / "out", log=lambda s: None)
    ckpt = tmp_path / "checkpoint-0.pth"
    torch.save({"model": {}, "optimizer": {}, "adapter_params": {"lora_layers": "0-2"}}, ckpt)
    with pytest.raises(FormatError, match=r"this project's main_finetune\.py.*extract_adapter_from_checkpoint"):
        import_official(ckpt, tmp_path / "out", log=lambda s: None)


def test_checkpoint_is_read_mapped_and_weights_only(tmp_path, monkeypatch):
    calls: list[dict] = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    torch.save({"model": build_official(CASES["lora"]), "args": run_args(CASES["lora"])}, tmp_path / "c.pth")
    import_official(tmp_path / "c.pth", tmp_path / "out", log=lambda s: None)
    assert calls[0]["weights_only"] is True and calls[0]["mmap"] is True


def test_flags_that_do_not_fit_name_the_tensors(tmp_path):
    torch.save(build_official(CASES["molora"]), tmp_path / "adapter.pth")
    with pytest.raises(FormatError, match=r"do not match.*layers\.0\.attention\.lora_Q\.lora_A_l\.2\.weight"):
        import_official(tmp_path / "adapter.pth", tmp_path / "out", flags="--expert_num 2", log=lambda s: None)
    with pytest.raises(FormatError, match=r"not used by these flags.*feed_forward\.lora_GATE"):
        import_official(tmp_path / "adapter.pth", tmp_path / "out", flags="--lora_targets Q,V,FFN_DOWN",
                        log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_torch_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(FormatError, match=r"notes\.pth: not a torch checkpoint file"):
        import_official(path, tmp_path / "out", log=lambda s: None)


def test_noise_layers_are_converted_and_the_instance_note_is_given(tmp_path):
    torch.save(build_official(CASES["adamole_noisy"]), tmp_path / "a.pth")
    import_official(tmp_path / "a.pth", tmp_path / "out", flags="--lora_alpha 16", log=lambda s: None)
    cfg = MoAConfig.from_json(str(tmp_path / "out" / "adapter_params.json"))
    assert cfg.noisy_router and cfg.expert_router == "adamole"
    converted = torch.load(tmp_path / "out" / "adapter.pth", weights_only=True)
    assert "layers.0.attention.wq.router.noise.weight" in converted
    torch.save(build_official(CASES["soft_moa_linear"]), tmp_path / "s.pth")
    notes: list[str] = []
    import_official(tmp_path / "s.pth", tmp_path / "out2", flags="--lora_alpha 16", log=notes.append)
    assert any("--type_router instance" in n for n in notes)


def test_pickle_of_another_class_is_refused_without_weights_only_false_hint(tmp_path):
    path = tmp_path / "checkpoint-1.pth"
    torch.save({"model": build_official(CASES["lora"]), "args": pathlib.PurePosixPath("/x")}, path)
    with pytest.raises(FormatError) as info:
        import_official(path, tmp_path / "out", log=lambda s: None)
    assert "PurePosixPath" in str(info.value) and "weights_only=False" not in str(info.value)


def test_cli_converts_and_fails_with_one_line(tmp_path):
    torch.save(build_official(CASES["p_adapter"]), tmp_path / "adapter.pth")
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "import_official.py"
    ok = subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / "adapter.pth"), "--out",
                         str(tmp_path / "out")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "adapter_params.json").is_file()
    bad = subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / "none.pth"), "--out",
                          str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "none.pth" in bad.stderr


def test_cli_refuses_an_out_holding_another_adapter_unless_overwrite(tmp_path):
    torch.save(build_official(CASES["p_adapter"]), tmp_path / "adapter.pth")
    torch.save(build_official(CASES["lora"]), tmp_path / "other.pth")
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "import_official.py"

    def cli(checkpoint: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "--checkpoint", str(tmp_path / checkpoint), "--out",
                               str(tmp_path / "out"), *extra], capture_output=True, text=True)

    assert cli("adapter.pth").returncode == 0
    before = (tmp_path / "out" / "adapter.pth").read_bytes()
    refused = cli("other.pth")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "out") in lines[0] and "--overwrite True" in lines[0], lines
    assert (tmp_path / "out" / "adapter.pth").read_bytes() == before
    replaced = cli("other.pth", "--overwrite", "True")
    assert replaced.returncode == 0, replaced.stderr
    assert (tmp_path / "out" / "adapter.pth").read_bytes() != before


def test_a_checkpoint_of_another_base_names_the_file_the_tensor_and_llama_path(tmp_path):
    from tests.helpers import TINY_PARAMS, write_meta_model_dir

    torch.save(build_official(CASES["lora"]), tmp_path / "adapter.pth")
    wider = tmp_path / "wider"
    write_meta_model_dir(wider, {**TINY_PARAMS, "dim": 128})
    with pytest.raises(FormatError) as info:
        import_official(tmp_path / "adapter.pth", tmp_path / "out", flags="--lora_alpha 16", llama_path=str(wider),
                        log=lambda s: None)
    message = str(info.value)
    paths = len(str(tmp_path / "adapter.pth")) + len(str(wider))
    assert "\n" not in message and len(message) - paths <= 200, (len(message), message)
    assert message.startswith(f"{tmp_path / 'adapter.pth'}: tensor layers.0.")
    assert f"--llama_path {wider}" in message and "probably trained on another base" in message
    assert "flags:" not in message and not (tmp_path / "out").exists()
