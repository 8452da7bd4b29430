"""llama/checkpoint.py on tiny random models written as Meta base-model directories.

Reference: the tensors written to disk (and the unsharded model); every comparison is exact.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from llama.checkpoint import CONTEXT_LLAMA31, CONTEXT_TIKTOKEN, load_model, save_model_dir
from tests.helpers import TINY_PARAMS, TINY_VOCAB, random_state_dict, write_meta_model_dir

TOKENS = torch.tensor([[1, 5, 17, 200, 33, 64, 90, 255, 300, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])


def test_load_fp32_equals_written_weights_exact(tmp_path):
    sd = write_meta_model_dir(tmp_path / "m")
    model, tok = load_model(tmp_path / "m")
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == torch.float32 and loaded[k].device.type == "cpu"
        assert torch.equal(loaded[k], v), k
    assert not any(p.is_meta for p in model.parameters())
    assert tok.n_words == TINY_VOCAB
    assert not model.training


def test_two_meta_shards_equal_unsharded_weights_and_logits_exact(tmp_path):
    sd = write_meta_model_dir(tmp_path / "one", n_shards=1)
    write_meta_model_dir(tmp_path / "two", sd=sd, n_shards=2)
    shard0 = torch.load(tmp_path / "two" / "consolidated.00.pth", weights_only=True)
    # Meta's split: each rank holds half the heads of wq/wk, half the columns of wo and of the embedding.
    assert shard0["layers.0.attention.wq.weight"].shape == (32, 64)
    assert shard0["layers.0.attention.wk.weight"].shape == (16, 64)
    assert shard0["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard0["tok_embeddings.weight"].shape == (TINY_VOCAB, 32)
    assert shard0["norm.weight"].shape == (64,)

    one, _ = load_model(tmp_path / "one")
    two, _ = load_model(tmp_path / "two")
    a, b = one.state_dict(), two.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(one(TOKENS), two(TOKENS))


def test_bf16_load_equals_fp32_weights_cast_exact(tmp_path):
    write_meta_model_dir(tmp_path / "m")
    fp32, _ = load_model(tmp_path / "m")
    bf16, _ = load_model(tmp_path / "m", dtype=torch.bfloat16)
    a, b = fp32.state_dict(), bf16.state_dict()
    for k in a:
        assert b[k].dtype == torch.bfloat16, k
        assert torch.equal(b[k], a[k].to(torch.bfloat16)), k


def test_bf16_checkpoint_loads_as_fp32_upcast_exact(tmp_path):
    # Meta ships bf16 weights; loading them in fp32 is an exact upcast.
    sd = write_meta_model_dir(tmp_path / "m", dtype=torch.bfloat16, n_shards=2)
    model, _ = load_model(tmp_path / "m", dtype=torch.float32)
    loaded = model.state_dict()
    for k, v in sd.items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], v.float()), k


def test_max_seq_len_defaults_to_and_is_capped_at_context(tmp_path):
    write_meta_model_dir(tmp_path / "l3")
    model, _ = load_model(tmp_path / "l3")
    assert model.args.max_seq_len == CONTEXT_TIKTOKEN
    assert load_model(tmp_path / "l3", max_seq_len=256)[0].args.max_seq_len == 256
    with pytest.raises(ValueError, match=r"max_seq_len 8193 exceeds the context length 8192"):
        load_model(tmp_path / "l3", max_seq_len=CONTEXT_TIKTOKEN + 1)

    write_meta_model_dir(tmp_path / "l31", params={**TINY_PARAMS, "use_scaled_rope": True})
    assert load_model(tmp_path / "l31")[0].args.max_seq_len == CONTEXT_LLAMA31


def test_vocab_size_minus_one_taken_from_tokenizer(tmp_path):
    write_meta_model_dir(tmp_path / "m", params={**TINY_PARAMS, "vocab_size": -1})
    model, tok = load_model(tmp_path / "m")
    assert model.args.vocab_size == tok.n_words == TINY_VOCAB


def test_llama2_rope_freqs_key_is_ignored(tmp_path):
    sd = write_meta_model_dir(tmp_path / "m")
    torch.save({**sd, "rope.freqs": torch.ones(8)}, tmp_path / "m" / "consolidated.00.pth")
    model, _ = load_model(tmp_path / "m")
    assert "rope.freqs" not in model.state_dict()


# ---- errors ----------------------------------------------------------------------------------

def test_missing_params_json_names_path(tmp_path):
    write_meta_model_dir(tmp_path / "m")
    (tmp_path / "m" / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "m" / "params.json"))):
        load_model(tmp_path / "m")


def test_unknown_params_key_names_key_and_file(tmp_path):
    write_meta_model_dir(tmp_path / "m")
    (tmp_path / "m" / "params.json").write_text(json.dumps({**TINY_PARAMS, "n_experts": 8}))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "m")
    assert "n_experts" in str(e.value) and str(tmp_path / "m" / "params.json") in str(e.value)


def test_missing_params_key_names_key_and_file(tmp_path):
    write_meta_model_dir(tmp_path / "m")
    params = dict(TINY_PARAMS)
    del params["n_layers"]
    (tmp_path / "m" / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "m")
    assert "n_layers" in str(e.value) and str(tmp_path / "m" / "params.json") in str(e.value)


def test_shard_gap_names_missing_shard(tmp_path):
    write_meta_model_dir(tmp_path / "m", params={**TINY_PARAMS, "n_heads": 4, "n_kv_heads": 4}, n_shards=4)
    (tmp_path / "m" / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth is missing"):
        load_model(tmp_path / "m")


def test_no_shard_at_all_is_file_not_found(tmp_path):
    write_meta_model_dir(tmp_path / "m")
    (tmp_path / "m" / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"no consolidated\.NN\.pth"):
        load_model(tmp_path / "m")


def test_missing_and_unexpected_weights_are_listed_with_directory(tmp_path):
    sd = write_meta_model_dir(tmp_path / "m")
    sd = dict(sd)
    del sd["layers.1.feed_forward.w3.weight"]
    sd["layers.1.feed_forward.w4.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "m")
    msg = str(e.value)
    assert "layers.1.feed_forward.w3.weight" in msg and "layers.1.feed_forward.w4.weight" in msg
    assert str(tmp_path / "m") in msg


def test_wrong_shape_names_key(tmp_path):
    sd = dict(write_meta_model_dir(tmp_path / "m"))
    sd["norm.weight"] = torch.ones(63)
    torch.save(sd, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"norm\.weight has shape \(63,\)"):
        load_model(tmp_path / "m")


def test_replicated_norm_that_differs_between_shards_is_an_error(tmp_path):
    write_meta_model_dir(tmp_path / "m", n_shards=2)
    path = tmp_path / "m" / "consolidated.01.pth"
    shard = torch.load(path, weights_only=True)
    shard["layers.0.ffn_norm.weight"] = shard["layers.0.ffn_norm.weight"] + 1
    torch.save(shard, path)
    with pytest.raises(ValueError, match=r"replicated tensor 'layers\.0\.ffn_norm\.weight' differs"):
        load_model(tmp_path / "m")


# ---- writing ---------------------------------------------------------------------------------

def test_save_model_dir_round_trips_and_refuses_existing(tmp_path):
    sd = random_state_dict(TINY_PARAMS)
    out = save_model_dir(tmp_path / "a" / "b", TINY_PARAMS, sd, {"note.txt": "hi"})
    write_meta_model_dir(tmp_path / "ref", sd=sd)  # for its tokenizer.model
    (out / "tokenizer.model").write_bytes((tmp_path / "ref" / "tokenizer.model").read_bytes())
    model, _ = load_model(out)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert (out / "note.txt").read_text() == "hi"
    with pytest.raises(FileExistsError):
        save_model_dir(out, TINY_PARAMS, sd)


def test_save_model_dir_failure_leaves_nothing(tmp_path):
    sd = random_state_dict(TINY_PARAMS)
    with pytest.raises(ValueError, match="bogus"):
        save_model_dir(tmp_path / "new" / "m", {**TINY_PARAMS, "bogus": 1}, sd)
    with pytest.raises(TypeError):  # a file that cannot be written fails half way
        save_model_dir(tmp_path / "new" / "m", TINY_PARAMS, sd, {"x.bin": 123})
    assert list(tmp_path.iterdir()) == []
