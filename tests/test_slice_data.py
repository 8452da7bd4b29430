"""scripts/slice_data.py: the slices the run scripts train and score on."""
from __future__ import annotations

import json
from pathlib import Path

import slice_data


def test_with_output_skips_rows_without_a_reference_keeping_order(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": "" if i in (1, 3) else f"a{i}"} for i in range(6)]
    rows[4]["output"] = "  \n"
    src = tmp_path / "test.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "slice.json"
    assert slice_data.main([str(src), "--rows", "2", "--with_output", "True", "--out", str(out)]) == 0
    assert [r["instruction"] for r in json.loads(out.read_text())] == ["q0", "q2"]
    assert slice_data.main([str(src), "--rows", "0", "--with_output", "True", "--out", str(out)]) == 0
    assert [r["instruction"] for r in json.loads(out.read_text())] == ["q0", "q2", "q5"]
    assert slice_data.main([str(src), "--rows", "3", "--out", str(out)]) == 0  # default: every row
    assert [r["instruction"] for r in json.loads(out.read_text())] == ["q0", "q1", "q2"]


def test_bundled_gsm8k_loss_slice_has_100_rows_with_references():
    src = Path(__file__).resolve().parents[1] / "data" / "math" / "gsm8k" / "test.json"
    picked = slice_data.slice_rows([src], 100, 0, with_output=True)
    assert len(picked) == 100 and all(r["output"].strip() for r in picked)
    assert not json.loads(src.read_text())[83]["output"].strip()  # the row that stopped the CPU-scale runs
