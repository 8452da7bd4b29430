"""llama/generation.py: batched greedy generation against each prompt alone and against transformers' generate."""
from __future__ import annotations

import pytest
import torch

from llama.generation import DONE_CHECK_EVERY, generate, sample_top_p
from llama.model import ModelArgs, Transformer
from tests.hf_reference import hf_twin

ARGS = dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=257, multiple_of=32,
            ffn_dim_multiplier=1.3, use_scaled_rope=True, max_seq_len=128)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelArgs(**ARGS)).eval()
    # Sharper logits than the default init so greedy choices are far from ties; random norm weights.
    with torch.no_grad():
        m.output.weight.mul_(8)
        for key, p in m.named_parameters():
            if key.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 257, (n,), generator=g).tolist() for n in (5, 17, 9)]


def test_batched_greedy_equals_each_prompt_alone_exact(model: Transformer, prompts: list[list[int]]) -> None:
    batched = generate(model, prompts, max_gen_len=24, stop_tokens=[])
    alone = [generate(model, [p], max_gen_len=24, stop_tokens=[])[0] for p in prompts]
    assert batched == alone
    assert all(len(row) == 24 for row in batched)


def test_batched_greedy_equals_transformers_generate_exact(model: Transformer, prompts: list[list[int]]) -> None:
    hf = hf_twin(model, attn_implementation="eager")
    ours = generate(model, prompts, max_gen_len=24, stop_tokens=[])
    for p, row in zip(prompts, ours):
        out = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, min_new_tokens=24,
                          eos_token_id=None, pad_token_id=0)
        assert out[0, len(p):].tolist() == row


def test_per_row_stop_token_cuts_that_row_only(model: Transformer, prompts: list[list[int]]) -> None:
    free = generate(model, prompts, max_gen_len=24, stop_tokens=[])
    stop = free[1][6]  # the 7th token of row 1 becomes a stop token
    cut = generate(model, prompts, max_gen_len=24, stop_tokens=[stop])
    for row_free, row_cut in zip(free, cut):
        expected = row_free[: row_free.index(stop)] if stop in row_free else row_free
        assert row_cut == expected
    assert len(cut[1]) <= 6


def test_stops_early_once_every_row_stopped(model: Transformer, prompts: list[list[int]]) -> None:
    steps = []
    free = generate(model, prompts, max_gen_len=24, stop_tokens=[])
    stops = [row[2] for row in free]  # every row has a stop token by step 3
    generate(model, prompts, max_gen_len=24, stop_tokens=stops, callback=lambda i, t: steps.append(i))
    # "every row stopped" is read back every DONE_CHECK_EVERY steps (no host sync per step): the
    # loop ends at the first check after step 3, well before max_gen_len.
    assert steps == list(range(DONE_CHECK_EVERY))


def test_tokenizer_stop_tokens_used_when_none_given(model: Transformer, prompts: list[list[int]]) -> None:
    free = generate(model, prompts[:1], max_gen_len=10, stop_tokens=[])
    tok = type("Tok", (), {"stop_tokens": [free[0][3]]})()
    assert generate(model, prompts[:1], max_gen_len=10, tokenizer=tok)[0] == free[0][:free[0].index(free[0][3])]


def test_sampling_seeded_reproducible_and_topp_tiny_is_greedy(model: Transformer, prompts: list[list[int]]) -> None:
    a = generate(model, prompts, 16, temperature=0.8, top_p=0.9, stop_tokens=[], generator=torch.Generator().manual_seed(1))
    b = generate(model, prompts, 16, temperature=0.8, top_p=0.9, stop_tokens=[], generator=torch.Generator().manual_seed(1))
    assert a == b
    greedy = generate(model, prompts, 16, stop_tokens=[])
    assert generate(model, prompts, 16, temperature=1.0, top_p=1e-6, stop_tokens=[]) == greedy


def test_sample_top_p_keeps_only_the_nucleus_hand_worked() -> None:
    # probs (0.5, 0.3, 0.15, 0.05): with top_p 0.7 the nucleus is {0, 1} (0.5 < 0.7, 0.5+0.3 >= 0.7).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    draws = sample_top_p(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.03


def test_prompt_too_long_raises_valueerror_with_lengths(model: Transformer) -> None:
    with pytest.raises(ValueError, match="200 tokens.*128"):
        generate(model, [[1] * 200], max_gen_len=4)


def test_generation_length_capped_at_max_seq_len(model: Transformer) -> None:
    out = generate(model, [[1] * 120], max_gen_len=50, stop_tokens=[])
    assert len(out[0]) == 8


def test_generate_drops_the_cache_it_made_and_keeps_the_callers(model: Transformer, prompts: list[list[int]]) -> None:
    """Reference: the same model before generate (a plain forward, and training, need no cache)."""
    tokens = torch.tensor([prompts[1]])
    with torch.no_grad():
        before = model(tokens)
    generate(model, prompts, max_gen_len=4, stop_tokens=[])
    assert model.cache_shape is None
    logits = model(tokens)
    logits.sum().backward()  # a cache made under inference_mode would refuse this
    assert torch.equal(logits.detach(), before)
    model.zero_grad(set_to_none=True)

    model.setup_caches(4, 64)
    try:
        cache = model.layers[0].attention.cache
        assert generate(model, prompts, max_gen_len=4, stop_tokens=[]) == generate(
            model, prompts[:2], max_gen_len=4, stop_tokens=[]) + [generate(model, prompts[2:], 4, stop_tokens=[])[0]]
        assert model.cache_shape == (4, 64) and model.layers[0].attention.cache is cache
    finally:
        model.clear_caches()
