"""llama/model.py against transformers' LlamaForCausalLM on the same random weights (fp32, CPU)."""
from __future__ import annotations

import copy
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llama.model import ModelArgs, Transformer
from llama.rope import rope_inv_freq
from tests.hf_reference import hf_config, hf_twin

CONFIGS = {
    # GQA, Meta's ffn_dim_multiplier rule, LLaMA-3.1 rope scaling
    "gqa_ffnmult_scaled": dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320,
                               ffn_dim_multiplier=1.3, multiple_of=64, use_scaled_rope=True, rope_theta=500000.0),
    "gqa_unscaled": dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=200, multiple_of=32,
                         use_scaled_rope=False, rope_theta=10000.0),
    "mha_ffnmult": dict(dim=64, n_layers=2, n_heads=4, vocab_size=128, ffn_dim_multiplier=1.5, multiple_of=16),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_model(name: str, max_seq_len: int = 1024, seed: int = 0) -> Transformer:
    """A random model of CONFIGS[name]; RMSNorm weights random too (not all ones), so that a norm
    applied in the wrong place, or mapped to the wrong transformers key, changes the logits."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**CONFIGS[name], max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seqlen", [1, 37, 512])
def test_logits_match_transformers_llama_fp32_rel1e_5(name: str, seqlen: int, attn: str) -> None:
    """Reference: transformers' LlamaForCausalLM, eager (matmul-softmax) and SDPA attention; rel <= 1e-5."""
    model = make_model(name)
    hf = hf_twin(model, attn_implementation=attn)
    tokens = torch.randint(0, model.args.vocab_size, (2, seqlen), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, seqlen, model.args.vocab_size)
    assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_frequencies_match_transformers_rope_init_exact(scaled: bool) -> None:
    args = ModelArgs(dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, vocab_size=8,
                     rope_theta=500000.0, use_scaled_rope=scaled)
    kind = "llama3" if scaled else "default"
    cfg = hf_config(args)
    theirs, _ = ROPE_INIT_FUNCTIONS[kind](cfg) if scaled else (
        1.0 / (args.rope_theta ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128)), 1.0)
    torch.testing.assert_close(rope_inv_freq(args), theirs, rtol=1e-6, atol=0)


def test_ffn_hidden_dim_meta_rule_llama31_8b_is_14336() -> None:
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                     multiple_of=1024, ffn_dim_multiplier=1.3)
    assert args.ffn_hidden_dim == 14336
    smol = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256)
    assert smol.ffn_hidden_dim == 1536


def test_kv_cache_token_by_token_equals_full_forward_rel1e_5() -> None:
    model = make_model("gqa_ffnmult_scaled", max_seq_len=64)
    tokens = torch.randint(0, model.args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(3, 64)
        first = model(tokens[:, :7], start_pos=0)  # a chunked prefill, then single tokens
        steps = [first] + [model(tokens[:, t:t + 1], start_pos=t) for t in range(7, 40)]
        model.clear_caches()
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_left_and_right_padding_equal_unpadded_rows_rel1e_5() -> None:
    model = make_model("gqa_unscaled")
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, model.args.vocab_size, (1, 11), generator=gen)
    b = torch.randint(0, model.args.vocab_size, (1, 6), generator=gen)
    with torch.no_grad():
        ref_a, ref_b = model(a), model(b)
        pad = torch.full((1, 5), 7)
        for batch, mask, sl in [
            (torch.cat([a, torch.cat([pad, b], 1)]), torch.cat([torch.ones(1, 11), torch.cat([torch.zeros(1, 5), torch.ones(1, 6)], 1)]).bool(), slice(5, 11)),
            (torch.cat([a, torch.cat([b, pad], 1)]), torch.cat([torch.ones(1, 11), torch.cat([torch.ones(1, 6), torch.zeros(1, 5)], 1)]).bool(), slice(0, 6)),
        ]:
            out = model(batch, token_mask=mask)
            assert torch.isfinite(out).all()
            assert rel_err(out[0:1], ref_a) <= 1e-5
            assert rel_err(out[1:2, sl], ref_b) <= 1e-5


def test_grad_checkpointing_gives_same_gradients_rel1e_6() -> None:
    model = make_model("mha_ffnmult").train()
    tokens = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))

    def grads(ckpt: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.grad_checkpointing = ckpt
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    for g0, g1 in zip(grads(False), grads(True)):
        assert rel_err(g1, g0) <= 1e-6


def test_flash_attn_path_used_when_asked_and_equal_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in flash_attn module (same calling convention: (B, T, H, hd), causal) checks the dispatch."""
    calls = []

    def flash_attn_func(q, k, v, causal):
        calls.append(q.shape)
        rep = q.shape[2] // k.shape[2]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                             v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    model = make_model("gqa_ffnmult_scaled")
    tokens = torch.randint(0, model.args.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(tokens)
        for layer in model.layers:
            layer.attention.attn_impl = "flash_attn"
        out = model(tokens)
    assert len(calls) == model.args.n_layers
    assert rel_err(out, ref) <= 1e-6


def test_model_args_bad_keys_raise_valueerror_naming_them() -> None:
    with pytest.raises(ValueError, match="rope_scaling"):
        ModelArgs.from_params(**CONFIGS["mha_ffnmult"], rope_scaling=2.0)
    with pytest.raises(ValueError, match="n_layers"):
        ModelArgs.from_params(dim=64, n_heads=4, vocab_size=10)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs.from_params(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, vocab_size=10)


def test_model_args_and_model_survive_deepcopy_and_pickle_exact() -> None:
    """Reference: the original model's logits; copies rebuild ModelArgs through its key checks."""
    model = make_model("gqa_unscaled")
    twin = copy.deepcopy(model)
    assert twin.args == model.args == pickle.loads(pickle.dumps(model.args))
    tokens = torch.randint(0, model.args.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(twin(tokens), model(tokens))


def test_sequence_longer_than_max_seq_len_raises_valueerror_with_lengths() -> None:
    model = make_model("mha_ffnmult", max_seq_len=16)
    with pytest.raises(ValueError, match="17.*16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bf16_forward_close_to_fp32_tiny_rel2e_2() -> None:
    model = make_model("gqa_ffnmult_scaled")
    tokens = torch.randint(0, model.args.vocab_size, (1, 8))
    with torch.no_grad():
        ref = model(tokens)
        out = model.to(torch.bfloat16)(tokens)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= 2e-2
