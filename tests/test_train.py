"""Training: the paper's Soft MoA command end to end with Meta's real tokenizer, DDP on 2 CPU processes
(Gloo) against one process, exact resume, the learning-rate schedule, label-only loss, bad inputs.

Run as a script (`python -m torch.distributed.run --nproc_per_node 2 tests/test_train.py OUT MODEL DATA`)
this file is also the DDP worker of `test_torchrun_two_cpu_processes_...`.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

import extract_adapter_from_checkpoint
import main_finetune
from llama.model import ModelArgs, Transformer  # noqa: E402
from moa import MoAConfig, adapter_state_dict, attach_adapters, load_adapter_state_dict  # noqa: E402
from moa.files.settings import sha256_file as file_sha256  # noqa: E402
from moa.train.data import Example, InstructionDataset, collate  # noqa: E402
from moa.train.schedule import WarmupCosine, param_groups, scaled_lr  # noqa: E402
from moa.train.trainer import CausalLMLoss, DistEnv, forward_backward, wrap_ddp  # noqa: E402
from tests.helpers import TINY_PARAMS, random_state_dict, write_meta_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)

SPARSE = dict(lora_layers="0-2", lora_rank=4, lora_targets="Q,K,V,O,FFN_DOWN", p_adapter_layers="0-2",
              p_adapter_size=8, swi_x=4, type_router="sparse")
UNUSED_SLOT = "lora.wk"  # its router bias is pushed to -30: no token selects it, on any rank


# ---- shared builders ---------------------------------------------------------------------------------


def _rows(n: int, answer: str = "The answer is 4.") -> list[dict]:
    return [{"instruction": f"What is {i} plus {4 - i}?", "input": "" if i % 2 else f"n={i}", "output": answer}
            for i in range(n)]


def _write_data(path: Path, rows) -> Path:
    path.write_text(rows if isinstance(rows, str) else json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def meta_tok_model_dir(tmp_path_factory) -> Path:
    """Tiny random model whose vocabulary covers Meta's real LLaMA-3 tokenizer.model (128256 ids)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("the llama-models wheel is not installed (pip install --no-deps llama-models==0.3.0)")
    d = tmp_path_factory.mktemp("meta_model") / "model"
    params = {**TINY_PARAMS, "dim": 32, "vocab_size": 128256, "use_scaled_rope": True}
    write_meta_model_dir(d, params)
    shutil.copy(Path(spec.origin).parent / "llama3" / "tokenizer.model", d / "tokenizer.model")
    return d


def _log(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def _sparse_model() -> tuple[Transformer, MoAConfig]:
    """Tiny model with Sparse MoA (learned threshold), adapters set to random values (seeded) so every
    gradient is nonzero, and one type that no token can select."""
    model = Transformer(ModelArgs(**TINY_PARAMS, max_seq_len=64))
    model.load_state_dict(random_state_dict(TINY_PARAMS, seed=0))
    cfg = MoAConfig(**SPARSE)
    attach_adapters(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in model.moa_adapter_names:
            p = model.get_parameter(name)
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for block in model.layers:
            router = block.type_router
            router.w2.bias[router.col[UNUSED_SLOT]] = -30.0
    return model, cfg


def _grad_batches() -> list[dict]:
    """8 examples of random ids with variable lengths, prompt and response lengths."""
    g = torch.Generator().manual_seed(2)
    items = []
    for _ in range(8):
        n = int(torch.randint(6, 24, (1,), generator=g))
        tokens = torch.randint(0, TINY_PARAMS["vocab_size"], (n,), generator=g).tolist()
        items.append(InstructionDataset([Example(tokens, int(torch.randint(1, n - 1, (1,), generator=g)))])[0])
    return items


def _grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# ---- DDP worker (runs under torchrun) ----------------------------------------------------------------
def _ddp_worker(out: Path, model_dir: Path, data_path: Path) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, cfg = _sparse_model()
    items = _grad_batches()
    mine = items[rank * 4:(rank + 1) * 4]
    env = DistEnv(rank, world, torch.device("cpu"))
    module = wrap_ddp(CausalLMLoss(model), env, cfg.has_unused_params)
    forward_backward(module, [collate(mine[:2]), collate(mine[2:])], env, bf16=False)
    if rank == 0:
        torch.save(_grads(model), out / "ddp_grads.pt")
    # The CLI itself, sparse MoA, 2 processes (it reuses this process group and ends it).
    return main_finetune.main([
        "--llama_path", str(model_dir), "--data_path", str(data_path), "--output_dir", str(out / "train"),
        "--data_root", str(out), "--max_seq_len", "300", "--batch_size", "2", "--epochs", "1",
        "--warmup_epochs", "0.5", "--blr", "0.1", "--num_workers", "0", "--device", "cpu", "--log_every", "1",
        *[a for k, v in SPARSE.items() for a in (f"--{k}", str(v))]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_sparse_moa_no_hang_and_grads_equal_one_process_rtol1e_5(tiny_model_dir, tmp_path):
    """Reference: one process on the 8 concatenated examples (one padded batch); 2 Gloo processes with
    2 micro-batches of 2 each must give the same averaged gradients (rtol 1e-5). One type is never
    selected, and the learned threshold gets no gradient (find_unused_parameters)."""
    data = _write_data(tmp_path / "train.json", _rows(8))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(Path(__file__)), str(tmp_path), str(tiny_model_dir), str(data)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "train" / "checkpoint-0.pth").is_file()
    assert len(_log(tmp_path / "train" / "log.txt", "step")) == 2  # 8 rows / (2 ranks x 2)

    model, _ = _sparse_model()
    forward_backward(CausalLMLoss(model), [collate(_grad_batches())], DistEnv(), bf16=False)
    single, ddp = _grads(model), torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    assert sorted(ddp) == sorted(single)
    assert not any("threshold" in n for n in single)  # a comparison: no gradient (paper's Sparse MoA)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-7, msg=name)
    unused = [n for n in single if ".attention.wk.lora_" in n]
    assert unused and all(single[n].abs().max() == 0 for n in unused)
    assert any(single[n].abs().max() > 0 for n in single if ".attention.wq.lora_" in n)


# ---- the paper's Soft MoA command ----------------------------------------------------------------------
def soft_moa_argv(model_dir: Path, data: Path, out: Path) -> list[str]:
    """The paper's Soft MoA command, N = 4 (accum_iter 32/4/8 = 1), layer spans 0-2 for the 2-layer model."""
    return ("--llama_path {m}/ --data_path {d} --expert_num 1 --lora_layers 0-2 --lora_rank 8 "
            "--lora_targets Q,K,V,O,FFN_DOWN --lora_alpha 8 --hydra_moe True --seed 0 --p_adapter_layers 0-2 "
            "--p_adapter_size 16 --p_adapter_hydra True --prompt_layers 0-2 --prompt_len 10 --swi_x 4 "
            "--max_seq_len 300 --batch_size 8 --accum_iter 1 --epochs 2 --warmup_epochs 1 --blr 6e-3 "
            "--flash_attention2 False --bf16 True --weight_decay 0.02 --output_dir {o}/ --num_workers 10"
            ).format(m=model_dir, d=data, o=out).split()


def _lr_formula(peak: float, min_lr: float, warmup: float, epochs: int, e: float) -> float:
    if e < warmup:
        return peak * e / warmup
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))


def test_paper_soft_moa_command_trains_bf16_with_meta_tokenizer_loss_down_files_and_extract(meta_tok_model_dir,
                                                                                            tmp_path, capsys):
    """The paper's Soft MoA command (plus --lr, --log_every 1, --data_root) on a tiny random model with Meta's
    tokenizer.model: loss goes down, lr follows the formula, checkpoints hold only adapters + state,
    extraction writes exactly the adapters and the flags to rebuild them."""
    rows = _rows(32)
    rows[3]["instruction"] = "What is 2 + 2?"  # also a test-set question in data_root: left out
    (tmp_path / "root" / "math" / "Toy").mkdir(parents=True)
    _write_data(tmp_path / "root" / "math" / "Toy" / "test.json", [{"instruction": "what is 2 +  2?", "output": ""}])
    data, out = _write_data(tmp_path / "train.json", rows), tmp_path / "out"
    argv = soft_moa_argv(meta_tok_model_dir, data, out) + ["--lr", "0.02", "--log_every", "1",
                                                         "--data_root", str(tmp_path / "root")]
    assert main_finetune.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 of 32 training rows repeat a question" in printed and "left out (rows [3])" in printed
    for kind in ("lora.wq", "lora.w2", "prompt", "p_adapter", "type_router", "total"):
        assert f"\n  {kind} " in printed, kind

    steps = _log(out / "log.txt", "step")
    epochs = _log(out / "log.txt", "epoch")
    assert [r["step"] for r in steps] == list(range(1, 9))  # 31 rows / batch 8 = 4 steps per epoch
    assert epochs[1]["loss"] < epochs[0]["loss"] - 0.5 and steps[-1]["loss"] < steps[0]["loss"] - 0.5
    for r in steps:  # step k of its epoch starts at fractional epoch epoch + k / 4
        e = r["epoch"] + ((r["step"] - 1) % 4) / 4
        assert r["lr"] == pytest.approx(_lr_formula(0.02, 0.0, 1.0, 2, e), rel=1e-12, abs=1e-15)
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in steps)

    ckpt = torch.load(out / "checkpoint-1.pth", weights_only=True)
    assert (out / "checkpoint-0.pth").is_file() and ckpt["epoch"] == 1 and ckpt["step"] == 8
    model = Transformer(ModelArgs(**json.loads((meta_tok_model_dir / "params.json").read_text()), max_seq_len=300))
    cfg = MoAConfig(**ckpt["adapter_params"])
    attach_adapters(model, cfg)
    assert sorted(ckpt["model"]) == sorted(adapter_state_dict(model)) and ckpt["base_trained"] == {}
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
    assert ckpt["args"]["bf16"] is True and ckpt["args"]["max_seq_len"] == 300

    assert extract_adapter_from_checkpoint.main(["--checkpoint", str(out / "checkpoint-1.pth")]) == 0
    adapter = torch.load(out / "adapter.pth", weights_only=True)
    params = json.loads((out / "adapter_params.json").read_text())
    assert params.pop("files") == {"adapter.pth": file_sha256(out / "adapter.pth")}  # the pair's manifest
    assert params.pop("max_seq_len") == 300 and MoAConfig(**params) == cfg
    load_adapter_state_dict(model, adapter)  # strict: exactly the adapters
    for name, t in adapter.items():
        assert torch.equal(t, ckpt["model"][name])
    assert not list(out.glob(".*tmp"))


def test_extract_rejects_files_that_are_not_our_checkpoints(tmp_path, capsys):
    torch.save({"model": {}, "epoch": 0}, tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("hello")
    for name, expected in (("other.pth", "not a moa training checkpoint"), ("text.pth", "not a moa training"),
                           ("missing.pth", "not found")):
        assert extract_adapter_from_checkpoint.main(["--checkpoint", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and name in err and expected in err
    assert not (tmp_path / "adapter.pth").exists() and not (tmp_path / "adapter_params.json").exists()


def test_extract_is_all_or_none_when_a_write_fails(tiny_model_dir, tmp_path, monkeypatch):
    """A failure while writing adapter_params.json leaves neither adapter.pth nor a temporary file."""
    data = _write_data(tmp_path / "train.json", _rows(2))
    out = tmp_path / "out"
    assert main_finetune.main(["--llama_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir",
                               str(out), "--data_root", str(tmp_path), "--lora_layers", "0-1", "--batch_size", "2",
                               "--epochs", "1", "--lr", "0.01", "--num_workers", "0"]) == 0

    def disk_full(obj, path):
        raise OSError(28, "No space left on device")
    import moa.files.adapters
    monkeypatch.setattr(moa.files.adapters, "write_json", disk_full)
    assert extract_adapter_from_checkpoint.main(["--checkpoint", str(out / "checkpoint-0.pth")]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-0.pth", "log.txt", "train_settings.json"]


# ---- resume ---------------------------------------------------------------------------------------------
def test_resume_continues_with_the_identical_loss_sequence_exact(tiny_model_dir, tmp_path, capsys):
    """One CPU process: epoch 1 after --resume checkpoint-0.pth logs exactly the losses and lrs of the
    uninterrupted run's epoch 1 (bitwise)."""
    data = _write_data(tmp_path / "train.json", _rows(12, "Sum: 4"))
    common = ["--llama_path", str(tiny_model_dir), "--data_path", str(data), "--data_root", str(tmp_path),
              "--lora_layers", "0-2", "--prompt_layers", "1-2", "--p_adapter_layers", "0-1", "--swi_x", "2",
              "--max_seq_len", "300", "--batch_size", "3", "--accum_iter", "2", "--epochs", "2",
              "--warmup_epochs", "0.5", "--lr", "0.01", "--num_workers", "0", "--log_every", "1", "--seed", "3"]
    assert main_finetune.main(common + ["--output_dir", str(tmp_path / "a")]) == 0
    assert main_finetune.main(common + ["--output_dir", str(tmp_path / "b"),
                                        "--resume", str(tmp_path / "a" / "checkpoint-0.pth")]) == 0
    full = [(r["step"], r["loss"], r["lr"]) for r in _log(tmp_path / "a" / "log.txt", "step") if r["epoch"] == 1]
    resumed = [(r["step"], r["loss"], r["lr"]) for r in _log(tmp_path / "b" / "log.txt", "step")]
    assert len(full) == 2 and resumed == full
    a1 = torch.load(tmp_path / "a" / "checkpoint-1.pth", weights_only=True)
    b1 = torch.load(tmp_path / "b" / "checkpoint-1.pth", weights_only=True)
    for name in a1["model"]:
        assert torch.equal(a1["model"][name], b1["model"][name]), name
    assert not (tmp_path / "b" / "checkpoint-0.pth").exists()
    # --start_epoch 1 without --resume: fresh adapters, but the schedule and step count of epoch 1.
    assert main_finetune.main(common + ["--output_dir", str(tmp_path / "s"), "--start_epoch", "1"]) == 0
    started = [(r["step"], r["lr"]) for r in _log(tmp_path / "s" / "log.txt", "step")]
    assert started == [(step, lr) for step, _, lr in full] and not (tmp_path / "s" / "checkpoint-0.pth").exists()
    other = common + ["--output_dir", str(tmp_path / "c"), "--lora_rank", "4",
                      "--resume", str(tmp_path / "a" / "checkpoint-0.pth")]
    assert main_finetune.main(other) == 2 and not (tmp_path / "c").exists()
    assert "it was trained with other settings (lora_rank 8 -> 4)" in capsys.readouterr().err


def test_resume_names_every_difference_in_one_message_adapter_flags_first(tiny_model_dir, tmp_path, capsys):
    """--resume into a new folder with another --lora_rank, --blr, --batch_size and --data_path: one
    line naming all four (lora_rank first, both data files); the data is compared by content and rows,
    and a checkpoint whose args predate the data's SHA-256 is compared on its data path."""
    data = _write_data(tmp_path / "train.json", _rows(4))
    other = _write_data(tmp_path / "other.json", _rows(3))
    common = ["--llama_path", str(tiny_model_dir), "--data_root", str(tmp_path), "--lora_layers", "0-1",
              "--max_seq_len", "300", "--epochs", "2", "--warmup_epochs", "0", "--num_workers", "0"]
    assert main_finetune.main(common + ["--data_path", str(data), "--output_dir", str(tmp_path / "a"),
                                        "--batch_size", "4", "--blr", "0.01"]) == 0
    ckpt = tmp_path / "a" / "checkpoint-0.pth"
    saved = torch.load(ckpt, weights_only=True)["args"]
    assert saved["data_sha256"] == file_sha256(data) and saved["data_rows"] == 4
    capsys.readouterr()
    differing = common + ["--output_dir", str(tmp_path / "b"), "--resume", str(ckpt), "--lora_rank", "4",
                          "--blr", "0.02", "--batch_size", "2", "--data_path", str(other)]
    assert main_finetune.main(differing) == 2 and not (tmp_path / "b").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    names = ["lora_rank 8 -> 4", "batch_size 4 -> 2", "blr 0.01 -> 0.02", f"data_path {data} -> {other}"]
    assert all(n in err[0] for n in names), err[0]
    assert err[0].index("lora_rank") < err[0].index("batch_size") < err[0].index("data_path"), err[0]
    # the same path holding other rows: named by content
    same_flags = common + ["--output_dir", str(tmp_path / "c"), "--batch_size", "4", "--blr", "0.01"]
    data.write_text(json.dumps(_rows(5)))
    assert main_finetune.main(same_flags + ["--resume", str(ckpt), "--data_path", str(data)]) == 2
    assert f"(data_path {data} -> {data} (sha256" in capsys.readouterr().err
    # a checkpoint written before the args held the data's hash: its path is what is compared
    old = torch.load(ckpt, weights_only=True)
    for key in ("data_sha256", "data_rows"):
        del old["args"][key]
    old["args"]["data_path"] = str(data)
    torch.save(old, tmp_path / "old.pth")
    assert main_finetune.main(same_flags + ["--resume", str(tmp_path / "old.pth"), "--data_path", str(other)]) == 2
    assert f"(data_path {data} -> {other})" in capsys.readouterr().err
    assert main_finetune.main(same_flags + ["--resume", str(tmp_path / "old.pth"), "--data_path", str(data)]) == 0

def test_w_bias_trains_norms_in_fp32_and_extract_writes_them_apart(tiny_model_dir, tmp_path, capsys):
    """Also --keep_test_overlap True: the row that repeats a test question is reported and kept."""
    rows = _rows(4)
    (tmp_path / "math" / "Toy").mkdir(parents=True)
    _write_data(tmp_path / "math" / "Toy" / "test.json", [rows[2]])
    data = _write_data(tmp_path / "train.json", rows)
    out = tmp_path / "out"
    assert main_finetune.main(["--llama_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir",
                               str(out), "--data_root", str(tmp_path), "--lora_layers", "0-1", "--w_bias", "True",
                               "--bf16", "True", "--max_seq_len", "300", "--batch_size", "4", "--epochs", "1",
                               "--warmup_epochs", "0", "--lr", "0.01", "--num_workers", "0",
                               "--keep_test_overlap", "True"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 4 training rows repeat a question of the 1 test sets" in printed
    assert "kept (--keep_test_overlap True) (rows [2])" in printed and "\n4 examples" in printed
    ckpt = torch.load(out / "checkpoint-0.pth", weights_only=True)
    norms = ["layers.0.attention_norm.weight", "layers.0.ffn_norm.weight", "layers.1.attention_norm.weight",
             "layers.1.ffn_norm.weight", "norm.weight"]
    assert sorted(ckpt["base_trained"]) == norms
    assert all(t.dtype == torch.float32 for t in ckpt["base_trained"].values())
    assert extract_adapter_from_checkpoint.main(["--checkpoint", str(out / "checkpoint-0.pth")]) == 0
    assert sorted(torch.load(out / "adapter.pth", weights_only=True)) == sorted(ckpt["model"])
    assert sorted(torch.load(out / "base_trained.pth", weights_only=True)) == norms


# ---- schedule, optimiser groups, loss ------------------------------------------------------------------
def test_lr_schedule_matches_formula_at_several_steps_rel1e_12():
    assert scaled_lr(6e-3, 8, 4, 1) == pytest.approx(6e-3 * 32 / 256, rel=1e-15)
    assert scaled_lr(6e-3, 8, 1, 4, lr=1e-4) == 1e-4
    sched = WarmupCosine(peak_lr=1e-3, min_lr=1e-5, warmup_epochs=0.5, epochs=3)
    for e in (0.0, 0.1, 0.25, 0.49, 0.5, 0.75, 1.0, 1.6, 2.2, 2.99, 3.0):
        assert sched.lr_at(e) == pytest.approx(_lr_formula(1e-3, 1e-5, 0.5, 3, e), rel=1e-12, abs=1e-18)
    assert sched.lr_at(0.0) == 0.0 and sched.lr_at(0.5) == pytest.approx(1e-3) and sched.lr_at(3.0) == 1e-5


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelArgs(**TINY_PARAMS, max_seq_len=64))
    attach_adapters(model, MoAConfig(lora_layers="0-1", prompt_layers="0-1", p_adapter_layers="0-1", swi_x=0))
    decay, no_decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.squeeze().dim() >= 2 for p in decay["params"])
    skipped = sorted(names[id(p)].split(".", 2)[2] for p in no_decay["params"])
    assert skipped == sorted(["attention.prompt.gate", "feed_forward.p_adapter.down_bias",
                              "feed_forward.p_adapter.up_bias", "type_router.proj.bias"])


def test_loss_is_cross_entropy_over_response_tokens_only_and_token_id_0_is_trained_rel1e_5():
    """Reference: full logits of `model(tokens, token_mask)` and F.cross_entropy (sum) at the positions
    whose next token is a response token, computed by hand; chunks of 3 rows; gradients too."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_PARAMS, max_seq_len=64))
    attach_adapters(model, MoAConfig(lora_layers="0-2", p_adapter_layers="0-2", swi_x=2))
    with torch.no_grad():
        for name in model.moa_adapter_names:
            model.get_parameter(name).normal_(0, 0.1)
    examples = [Example([256, 10, 11, 12, 0, 13, 257], 4), Example([256, 20, 0, 21, 257], 2)]
    batch = collate([InstructionDataset(examples)[i] for i in range(2)])
    assert batch["labels"][0].tolist() == [-100, -100, -100, -100, 0, 13, 257]  # id 0 kept as a label

    loss_sum, _ = CausalLMLoss(model, chunk_rows=3)(batch["tokens"], batch["labels"], batch["token_mask"])
    loss_sum.backward()
    ours = _grads(model)
    model.zero_grad()
    logits = model(batch["tokens"], token_mask=batch["token_mask"])
    positions = [(0, 3), (0, 4), (0, 5), (1, 1), (1, 2), (1, 3)]  # predict tokens 0, 13, 257 and 0, 21, 257
    targets = torch.tensor([0, 13, 257, 0, 21, 257])
    ref = F.cross_entropy(torch.stack([logits[b, t] for b, t in positions]), targets, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(ours[name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---- bad inputs -----------------------------------------------------------------------------------------
def _bad_cases(tmp_path: Path, model_dir: Path) -> list[tuple[list[str], str]]:
    good = _write_data(tmp_path / "good.json", _rows(2))
    no_params = tmp_path / "no_params"
    shutil.copytree(model_dir, no_params)
    (no_params / "params.json").unlink()
    return [
        (["--data_path", str(tmp_path / "missing.json")], "missing.json: data file not found"),
        (["--data_path", str(_write_data(tmp_path / "broken.json", "[{"))], "broken.json: not valid JSON"),
        (["--data_path", str(_write_data(tmp_path / "no_out.json", [{"instruction": "a", "output": "b"},
                                                                     {"instruction": "c"}]))],
         "no_out.json: row 1: missing field 'output'"),
        (["--data_path", str(good), "--lora_targets", "Q,X"], "--lora_targets"),
        (["--data_path", str(good), "--lora_layers", "5-2"], "--lora_layers"),
        (["--data_path", str(good), "--lora_layers", "0-9"], "--lora_layers: span 0-9 is out of range"),
        (["--data_path", str(good), "--llama_path", str(no_params)], "no params.json"),
        (["--data_path", str(good), "--batch_size", "0"], "--batch_size"),
        (["--data_path", str(good), "--resume", str(tmp_path / "nockpt.pth")], "--resume"),
    ]


def test_bad_inputs_give_one_line_errors_and_leave_no_output_dir(tiny_model_dir, tmp_path, capsys):
    for i, (extra, expected) in enumerate(_bad_cases(tmp_path, tiny_model_dir)):
        out = tmp_path / f"out{i}"
        argv = ["--llama_path", str(tiny_model_dir), "--output_dir", str(out), "--data_root", str(tmp_path),
                "--num_workers", "0"] + extra
        assert main_finetune.main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and "Traceback" not in err, (extra, err)
        assert not out.exists(), extra


def test_bad_input_from_the_shell_exits_2_without_traceback(tiny_model_dir, tmp_path):
    data = _write_data(tmp_path / "no_out.json", [{"instruction": "c", "input": ""}])
    proc = subprocess.run([sys.executable, "main_finetune.py", "--llama_path", str(tiny_model_dir),
                           "--data_path", str(data), "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {data}: row 0: missing field 'output' (a string)"
    assert not (tmp_path / "out").exists()


def test_boolean_flags_take_true_false_and_bare_flag_means_true():
    parser = main_finetune.build_parser()
    base = ["--llama_path", "m", "--data_path", "d"]
    assert parser.parse_args(base + ["--bf16", "True", "--hydra_moe", "False"]).bf16 is True
    assert parser.parse_args(base + ["--hydra_moe", "False"]).hydra_moe is False
    assert parser.parse_args(base + ["--bf16"]).bf16 is True
    assert parser.parse_args(base).bf16 is False
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--bf16", "maybe"])


# ---- memory features and padding -----------------------------------------------------------------------
def _soft_moa_model(type_router: str = "soft") -> Transformer:
    """Tiny model with the paper's Soft MoA command's adapter types (7 per block), adapters at random values."""
    model = Transformer(ModelArgs(**TINY_PARAMS, max_seq_len=64))
    model.load_state_dict(random_state_dict(TINY_PARAMS, seed=0))
    attach_adapters(model, MoAConfig(lora_layers="0-2", lora_rank=4, p_adapter_layers="0-2", p_adapter_size=8,
                                     prompt_layers="0-2", prompt_len=3, swi_x=2, type_router=type_router))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in model.moa_adapter_names:
            p = model.get_parameter(name)
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_grad_checkpointing_gives_the_same_loss_and_grads_rtol1e_6():
    """Reference: the same forward/backward without --grad_checkpointing (Soft MoA, padded batch)."""
    model = _soft_moa_model()
    batch = collate(_grad_batches()[:4])
    results = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.grad_checkpointing = checkpointing
        loss_sum, _ = forward_backward(CausalLMLoss(model), [batch], DistEnv(), bf16=False)
        results.append((loss_sum, _grads(model)))
    (loss_ref, grads_ref), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_ref, rtol=1e-6, atol=0)
    assert sorted(grads_ckpt) == sorted(grads_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads_ckpt[name], grads_ref[name], rtol=1e-6, atol=1e-8, msg=name)


def test_loss_never_builds_vocab_sized_logits_for_backward_and_never_calls_output():
    """Label-only loss: `model.output` is never called (no (B, T, V) logits), and no tensor saved for
    backward has a vocabulary-sized dimension (each chunk's logits die inside the chunk)."""
    model = _soft_moa_model()
    model.output.register_forward_hook(lambda *a: pytest.fail("model.output computed full logits"))
    batch = collate(_grad_batches())
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, _ = CausalLMLoss(model, chunk_rows=5)(batch["tokens"], batch["labels"], batch["token_mask"])
    loss_sum.backward()
    assert saved and not [s for s in saved if TINY_PARAMS["vocab_size"] in s]


@pytest.mark.parametrize("type_router", ["soft", "sparse", "instance"])
def test_padding_changes_neither_loss_nor_grads_vs_each_row_alone_rtol1e_5_of_max(type_router):
    """Reference: every row run alone, unpadded (no mask), losses and gradients summed. The padded
    batch must match: pads reach neither attention, the routers nor the loss."""
    model = _soft_moa_model(type_router)
    items = _grad_batches()[:4]
    batch = collate(items)
    loss_batch, _ = CausalLMLoss(model)(batch["tokens"], batch["labels"], batch["token_mask"])
    loss_batch.backward()
    grads_batch = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_rows = sum(CausalLMLoss(model)(item["tokens"][None], item["labels"][None], None)[0] for item in items)
    loss_rows.backward()
    torch.testing.assert_close(loss_batch, loss_rows, rtol=1e-5, atol=0)
    grads_rows = _grads(model)
    assert sorted(grads_rows) == sorted(grads_batch)
    for name, g in grads_rows.items():  # atol: fp32 sums in another order, relative to the tensor's scale
        torch.testing.assert_close(grads_batch[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=name)


def test_flash_attention2_true_without_flash_attn_says_it_falls_back_to_sdpa(tiny_model_dir, tmp_path, capsys):
    """On CPU (and wherever flash-attn is missing) --flash_attention2 True trains with SDPA and says so;
    bare boolean flags mean True; a row whose prompt alone exceeds --max_seq_len is skipped and counted."""
    rows = _rows(2) + [{"instruction": "x" * 400, "output": "y"}]
    data = _write_data(tmp_path / "train.json", rows)
    argv = ["--llama_path", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
            "--data_root", str(tmp_path), "--lora_layers", "0-1", "--max_seq_len", "300", "--batch_size", "2",
            "--epochs", "1", "--lr", "0.01", "--num_workers", "0", "--flash_attention2", "--grad_checkpointing"]
    assert main_finetune.main(argv) == 0
    printed = capsys.readouterr().out
    assert "--flash_attention2 True: it needs a CUDA device; falling back to PyTorch SDPA attention" in printed
    assert "1 rows skipped: their prompt alone fills --max_seq_len 300 (rows [2])" in printed
    ckpt = torch.load(tmp_path / "out" / "checkpoint-0.pth", weights_only=True)
    assert ckpt["args"]["flash_attention2"] is True and ckpt["args"]["grad_checkpointing"] is True

if __name__ == "__main__":
    sys.exit(_ddp_worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
