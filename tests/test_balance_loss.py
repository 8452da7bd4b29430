"""The official load-balance losses worked by hand (top-k with k = 2, AdaMoLE), and `--noisy_router`.

Hand-worked: 3 real tokens and 1 pad, 3 experts, the router's projection the identity, so the logits
are the written-out `log p` and the softmax weights are the written-out p (fp64, rel 1e-12).
"""
from __future__ import annotations

import math

import pytest
import torch

from llama import ModelArgs, Transformer
from moa import MoAConfig, attach_adapters, collect_aux_loss
from moa.method.routers import ExpertRouter, collecting_aux_losses
from moa.train.checkpointing import capture_rng_state, restore_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")

# Softmax weights of the 3 real tokens, then of a pad (which must not count).
P = torch.tensor([[0.5, 0.3, 0.2],
                  [0.6, 0.3, 0.1],
                  [0.3, 0.1, 0.6],
                  [0.9, 0.07, 0.03]], dtype=torch.float64)
REAL = torch.tensor([True, True, True, False])


def identity_router(kind: str, **flags) -> ExpertRouter:
    """An ExpertRouter over 3 experts whose logits are its input (proj = I, bias 0); AdaMoLE's threshold
    layer has weight 0 and bias 0, so tau = sigmoid(0) / 3 = 1/6 on every token."""
    cfg = MoAConfig(expert_num=3, expert_router=kind, lb_loss_coeff=1.0, **flags)
    router = ExpertRouter(3, 3, cfg, False, device=torch.device("cpu"), dtype=torch.float64)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(3, dtype=torch.float64))
        router.proj.bias.zero_()
        if router.threshold is not None:
            router.threshold.weight.zero_()
            router.threshold.bias.zero_()
    return router


def routed_loss(router: ExpertRouter) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (4, 3), the load-balance term) of one training forward on log P with the pad masked."""
    with collecting_aux_losses() as terms:
        w = router(P.log(), REAL)
    assert len(terms) == 1
    return w, terms[0]


def test_topk2_balance_loss_by_hand_pads_excluded():
    router = identity_router("topk", top_k=2)
    w, loss = routed_loss(router)
    # top-2 of each real token: t1 {0, 1}, t2 {0, 1}, t3 {2, 0}: counts (3, 2, 1) over N = 3 (pad out)
    # f = (3/3, 2/3, 1/3), sum f = 2 = k.  P_i = mean p_i = (1.4/3, 0.7/3, 0.9/3).
    # E * sum f_i P_i = 3 * (1.4/3 + (2/3)(0.7/3) + (1/3)(0.9/3)) = 1.4 + 1.4/3 + 0.3 = 13/6.
    assert abs(loss.item() - 13 / 6) <= 1e-12 * 13 / 6
    # the weights: the top 2, renormalised: t1 (0.5, 0.3) / 0.8
    assert torch.allclose(w[0], torch.tensor([0.625, 0.375, 0.0], dtype=torch.float64), rtol=1e-12, atol=0)
    # unmasked, the pad counts (as in the official code): t4 {0, 1}, f = (4, 3, 1)/4, P = (2.3, 0.77, 0.93)/4,
    # 3 * (0.575 + 0.75 * 0.1925 + 0.25 * 0.2325) = 2.3325: the mask is what keeps it out
    with collecting_aux_losses() as terms:
        router(P.log(), None)
    assert abs(terms[0].item() - 2.3325) <= 1e-12 * 2.3325


def test_adamole_balance_loss_by_hand_and_it_trains_the_threshold():
    router = identity_router("adamole")
    _, loss = routed_loss(router)
    # tau = 1/6; a = p - 1/6:  t1 (1/3, 2/15, 1/30) all >= 0;  t2 (13/30, 2/15, -1/15);  t3 (2/15, -1/15, 13/30)
    # f = share with a_i >= 0 = (3/3, 2/3, 2/3);  P_i = mean a_i = (0.9/3, 0.2/3, 0.4/3)
    # E * sum f_i P_i = 3 * (0.3 + (2/3)(0.2/3) + (2/3)(0.4/3)) = 0.9 + 0.4/3 = 13/10
    assert abs(loss.item() - 1.3) <= 1e-12 * 1.3
    loss.backward()
    # d loss / d tau = -E * sum f = -3 * 7/3 = -7 (every real token's tau lowers every P_i by 1/N each);
    # d tau / d bias = sigmoid'(0) / E = 1/12  ->  d loss / d bias = -7/12
    assert abs(router.threshold.bias.grad.item() + 7 / 12) <= 1e-12


# ---- --noisy_router ----------------------------------------------------------------------------------------
TINY = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=32)
NOISY = dict(lora_layers="0-1", lora_targets="Q,V", lora_rank=2, expert_num=3, expert_router="topk", top_k=1,
             type_router="none", noisy_router=True)


def model_with(flags: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = attach_adapters(Transformer(ModelArgs(**TINY)), MoAConfig(**flags))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in model.moa_adapter_names:
            p = model.get_parameter(name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))


def loss_of(model: Transformer) -> torch.Tensor:
    return model(TOKENS).logsumexp(-1).mean()


def test_noisy_router_eval_is_deterministic_and_noise_free():
    noisy = model_with(NOISY).eval()
    plain = model_with({**NOISY, "noisy_router": False}).eval()
    with torch.no_grad():
        plain.load_state_dict(noisy.state_dict(), strict=False)  # the same proj/LoRA (plain has no noise layer)
        a, b, c = noisy(TOKENS), noisy(TOKENS), plain(TOKENS)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_noisy_router_trains_noise_layer_and_is_seeded():
    model = model_with(NOISY).train()
    torch.manual_seed(7)
    first = loss_of(model)
    first.backward()
    noise = model.layers[0].attention.wq.router.noise
    assert noise.weight.grad is not None and noise.weight.grad.abs().sum() > 0
    torch.manual_seed(7)
    again = loss_of(model)
    assert torch.equal(first, again)  # same seed, same noise
    different = loss_of(model)
    assert not torch.equal(first, different)  # the next draw differs: there is noise in training


def test_noisy_router_resume_with_saved_rng_state_is_exact(tmp_path):
    """A checkpoint's RNG state (moa.train.checkpointing) restores the noise stream exactly."""
    model = model_with(NOISY).train()
    torch.manual_seed(11)
    loss_of(model)  # the steps before the checkpoint
    torch.save({"rng": capture_rng_state()}, tmp_path / "ckpt.pth")
    after = [loss_of(model) for _ in range(2)]  # the run that was not interrupted
    torch.manual_seed(999)  # a fresh process: another state, until the checkpoint's is restored
    restore_rng_state(torch.load(tmp_path / "ckpt.pth", weights_only=True)["rng"])
    resumed = [loss_of(model) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(after, resumed))


def test_lb_loss_of_noisy_router_reaches_collect_aux_loss():
    model = model_with({**NOISY, "lb_loss_coeff": 0.1}).train()
    model(TOKENS)
    aux = collect_aux_loss(model)
    assert aux.item() > 0 and math.isfinite(aux.item())
