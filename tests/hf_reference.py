"""transformers' LlamaForCausalLM holding the same weights as one of our models: the independent reference.

Meta's checkpoints store wq/wk rows with rotary pairs interleaved (x[2i], x[2i+1]); transformers
rotates halves (x[i], x[i + hd/2]). Within each head, row 2i+j of Meta's layout is row i + j*hd/2
of transformers' layout.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama.model import ModelArgs, Transformer


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a Meta wq/wk weight (n_heads*hd, in) into transformers' rotary layout."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=max(args.max_seq_len, 131072 if args.use_scaled_rope else 0), rms_norm_eps=args.norm_eps, rope_parameters=rope,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our (Meta-named) state dict -> transformers LlamaForCausalLM keys and rotary layout."""
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(args.n_layers):
        for ours, theirs in names.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            if ours == "attention.wq":
                w = interleaved_to_half_split(w, args.n_heads)
            elif ours == "attention.wk":
                w = interleaved_to_half_split(w, args.n_kv_heads)
            out[f"model.layers.{i}.{theirs}.weight"] = w
    return out


def hf_twin(model: Transformer, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    """A transformers LLaMA (fp32, eval mode) with exactly our model's weights.

    attn_implementation: "sdpa" (transformers' default, the fair speed comparison) or "eager"
    (transformers' own matmul-softmax attention: a reference independent of the SDPA kernel we use).
    """
    hf = LlamaForCausalLM(hf_config(model.args)).eval()
    hf.config._attn_implementation = attn_implementation
    hf.load_state_dict(meta_to_hf_state_dict(model.state_dict(), model.args), strict=True)
    return hf
