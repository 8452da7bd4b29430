"""flash-attn's varlen path for padded training batches, checked on CPU.

The index construction (`varlen_index`, `pack_rows`, `unpack_rows`) is checked against a dense
reference: a pure-torch attention that reads sequences by `cu_seqlens` alone, compared with SDPA
under the padding mask. A stand-in `flash_attn` module with that reference as its varlen kernel
then runs the model's dispatch end to end; without flash-attn the model falls back to SDPA.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from llama.flash import pack_rows, unpack_rows, varlen_index
from llama.model import ModelArgs, Transformer

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: int, causal: bool = True) -> torch.Tensor:
    """Packed q (N, H, hd), k, v (N, KV, hd), sequence i = rows cu_seqlens[i]:cu_seqlens[i+1] ->
    (N, H, hd): softmax(q k^T / sqrt(hd)) v within each sequence, causal, GQA by head groups."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        assert end - start <= max_seqlen
        qi = q[start:end].transpose(0, 1)  # (H, n, hd)
        ki = k[start:end].repeat_interleave(rep, 1).transpose(0, 1)
        vi = v[start:end].repeat_interleave(rep, 1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) / qi.shape[-1] ** 0.5
        if causal:
            n = end - start
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out[start:end] = (scores.softmax(-1) @ vi).transpose(0, 1)
    return out


def _mask(lengths: list[int], seqlen: int, left: bool) -> torch.Tensor:
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if left:
            mask[i, seqlen - n:] = True
        else:
            mask[i, :n] = True
    return mask


@pytest.mark.parametrize("left", [True, False])
def test_varlen_index_packs_rows_as_a_dense_masked_attention_reads_them(left: bool) -> None:
    torch.manual_seed(0)
    lengths, seqlen, h, kv, hd = [5, 9, 1, 7], 9, 4, 2, 8
    mask = _mask(lengths, seqlen, left)
    q, k, v = torch.randn(4, h, seqlen, hd), torch.randn(4, kv, seqlen, hd), torch.randn(4, kv, seqlen, hd)
    idx = varlen_index(mask)
    assert idx.cu_seqlens.tolist() == [0, 5, 14, 15, 22] and idx.cu_seqlens.dtype == torch.int32
    assert idx.max_seqlen == 9
    packed = [pack_rows(t.transpose(1, 2), idx) for t in (q, k, v)]
    out = unpack_rows(varlen_attention_reference(*packed, idx.cu_seqlens, idx.max_seqlen), idx, 4, seqlen)
    dense_mask = torch.ones(seqlen, seqlen, dtype=torch.bool).tril() & mask[:, None, :]
    dense_mask |= torch.eye(seqlen, dtype=torch.bool)  # pads read themselves (their output is unused)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask[:, None], enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-5, atol=1e-6)
    assert not out[~mask].any()  # pads come back as zeros


def test_pack_then_unpack_is_identity_on_real_tokens() -> None:
    mask = _mask([3, 1, 4], 4, left=True)
    x = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    idx = varlen_index(mask)
    assert pack_rows(x, idx).shape == (8, 2)
    torch.testing.assert_close(unpack_rows(pack_rows(x, idx), idx, 3, 4), x * mask[..., None])


def _fake_flash(calls: list[str]) -> types.SimpleNamespace:
    """A flash_attn stand-in: the reference as its varlen kernel; the unpadded kernel by SDPA."""
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        calls.append("varlen")
        assert torch.equal(cu_q, cu_k) and max_q == max_k
        return varlen_attention_reference(q, k, v, cu_q, max_q, causal)

    def flash_attn_func(q, k, v, causal=False):
        calls.append("dense")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)
    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func, flash_attn_func=flash_attn_func)


def _pair() -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    sdpa = Transformer(ModelArgs(**ARGS))
    flash = Transformer(ModelArgs(**ARGS, attn_impl="flash_attn"))
    flash.load_state_dict(sdpa.state_dict())
    return sdpa, flash


def test_padded_training_forward_uses_varlen_and_matches_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash(calls))
    sdpa, flash = _pair()
    tokens = torch.randint(0, ARGS["vocab_size"], (3, 12))
    mask = _mask([12, 7, 3], 12, left=False)
    ref = sdpa(tokens, token_mask=mask)
    out = flash(tokens, token_mask=mask)
    assert calls == ["varlen"] * ARGS["n_layers"]
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-4, atol=1e-5)
    out[mask].sum().backward()  # the packed path is differentiable (index_select / index_copy)
    flash(tokens)  # unpadded: the plain kernel
    assert calls[-ARGS["n_layers"]:] == ["dense"] * ARGS["n_layers"]


def test_without_flash_attn_padded_batches_fall_back_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    import llama.flash as lm

    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.setattr(lm, "_flash_attn_installed", lambda: False)
    sdpa, flash = _pair()
    tokens = torch.randint(0, ARGS["vocab_size"], (2, 10))
    mask = _mask([10, 4], 10, left=True)
    with torch.no_grad():
        torch.testing.assert_close(flash(tokens, token_mask=mask), sdpa(tokens, token_mask=mask))
        torch.testing.assert_close(flash(tokens), sdpa(tokens))
