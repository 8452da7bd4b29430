"""Qwen3 (dense) through the LLaMA model's architecture flags (`qk_norm`, `attn_head_dim`, tied embeddings),
loaded from a Hugging Face folder, against transformers' Qwen3ForCausalLM on random weights (fp32):
logits, batched greedy generation, export and back; every adapter type attaches and runs."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from llama import ModelArgs, Transformer  # noqa: E402
from llama.checkpoint import load_model  # noqa: E402
from llama.generation import generate  # noqa: E402
from llama.hf import params_from_config  # noqa: E402
from moa import MoAConfig, attach_adapters, count_adapter_parameters  # noqa: E402
from scripts.export_hf import export_hf  # noqa: E402
from tests.helpers import rel  # noqa: E402
from tests.test_hf_checkpoint import hf_logits, hf_tokenizer, our_logits, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

VOCAB = 320
# The paper's Soft MoA command (7 types, swi_x 4) at Qwen3-8B's shape.
SOFT_MOA = dict(lora_layers="0-36", lora_rank=8, lora_alpha=8, lora_targets="Q,K,V,O,FFN_DOWN", hydra_moe=True,
                expert_num=1, p_adapter_layers="0-36", p_adapter_size=16, p_adapter_hydra=True, prompt_layers="0-36",
                prompt_len=10, swi_x=4)
QWEN3_8B = {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
            "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}


def write_hf_qwen3(path, tie: bool = True, seed: int = 0) -> "transformers.Qwen3ForCausalLM":
    """A random fp32 Qwen3ForCausalLM (head_dim 32 != hidden 64 / 4 heads; random norms, q/k norms included)
    saved by transformers, sharded at 200KB, with a ChatML tokenizer. Returns it in eval mode."""
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=tie, use_sliding_window=False)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="200KB")
    hf_tokenizer(bos=False).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3") / "hf"
    return d, write_hf_qwen3(d)


def test_qwen3_folder_loads_with_transformers_logits(qwen3):
    path, ref = qwen3
    model, tok = load_model(path)
    assert model.args.qk_norm and model.args.head_dim == 32 and model.args.dim == 64
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert tok.chat_template == "chatml"
    x = tokens()
    assert rel(our_logits(model, x), hf_logits(ref, x)) <= 1e-5


def test_qwen3_untied(tmp_path):
    ref = write_hf_qwen3(tmp_path / "hf", tie=False, seed=2)
    model, _ = load_model(tmp_path / "hf")
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    x = tokens()
    assert rel(our_logits(model, x), hf_logits(ref, x)) <= 1e-5


def test_qwen3_batched_greedy_generation_matches_transformers(qwen3):
    path, ref = qwen3
    model, _ = load_model(path)
    prompts = [[5, 9, 33, 70, 2, 8, 1], [101, 7], [44, 45, 46]]
    ours = generate(model, prompts, max_gen_len=8, temperature=0.0, stop_tokens=[])
    for prompt, new in zip(prompts, ours):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        assert new == out[0, len(prompt):].tolist()


def test_qwen3_export_loads_as_qwen3_in_transformers(qwen3, tmp_path):
    path, ref = qwen3
    out = export_hf(path, tmp_path / "out", max_shard_size="100KB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["head_dim"] == 32 and config["tie_word_embeddings"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen3ForCausalLM"
    x = tokens()
    assert rel(hf_logits(back, x), hf_logits(ref, x)) <= 1e-5


def test_lora_at_zero_init_equals_bare_logits_on_qwen3(qwen3):
    path, _ = qwen3
    model, _ = load_model(path)
    x = tokens()
    bare = our_logits(model, x)
    attach_adapters(model, MoAConfig(lora_layers="0-2", lora_rank=4, lora_targets="Q,K,V,O,FFN_GATE,FFN_UP,FFN_DOWN",
                                     type_router="none"))
    assert rel(our_logits(model, x), bare) <= 1e-6


@pytest.mark.parametrize("flags", [
    dict(SOFT_MOA, lora_layers="0-2", p_adapter_layers="0-2", prompt_layers="0-2"),  # Soft MoA, 7 types
    dict(lora_layers="0-2", lora_rank=4, lora_targets="Q,V", expert_num=4, expert_router="topk", top_k=2,
         p_adapter_layers="0-2", p_adapter_size=8, type_router="sparse"),
    dict(lora_layers="0-2", lora_rank=4, expert_num=4, expert_router="adamole", type_router="instance",
         prompt_layers="0-2", prompt_len=3),
    dict(lora_layers="0-2", lora_rank=4, p_adapter_layers="0-2", prompt_layers="0-2", prompt_len=3,
         type_router="unipeft"),
], ids=["soft-moa", "sparse-topk", "instance-adamole", "unipeft"])
def test_every_adapter_and_router_runs_on_qwen3_with_gradients(qwen3, flags):
    path, _ = qwen3
    model, _ = load_model(path)
    attach_adapters(model, MoAConfig(**flags))
    mask = torch.tensor([[True] * 11, [False] * 3 + [True] * 8])
    logits = model(tokens(), token_mask=mask)
    assert torch.isfinite(logits).all()
    logits[mask].logsumexp(-1).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_paper_soft_moa_trainable_parameters_at_the_qwen3_8b_shape():
    params = params_from_config(QWEN3_8B, "Qwen3-8B config.json")
    with torch.device("meta"):
        model = Transformer(ModelArgs(**params))
    assert model.args.ffn_hidden_dim == 12288 and model.args.head_dim == 128
    attach_adapters(model, MoAConfig(**SOFT_MOA))
    n = count_adapter_parameters(model)
    print(f"\nSoft MoA (the paper's Soft MoA command) at the Qwen3-8B shape: {n / 1e6:.2f}M trainable parameters")
    assert round(n / 1e6, 2) == 27.00
