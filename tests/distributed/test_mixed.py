"""Mixed-task prediction gives each row what `ipt-ds predict` (a DeepSpeed engine in its own process) gives its
export."""

from __future__ import annotations

import json

import torch

from tests.conftest import finish_cli, start_cli
from tests.unit import test_mixed as in_process
from tests.unit.test_mixed import ROWS, write_rows

exports = in_process.exports  # the module-scoped fixture: its exports are built again for this module


def test_each_row_gets_its_exports_prediction_as_predict_gives_it(tmp_path, exports):
    names = {name: str(path) for name, path in exports.items()}
    spec = ",".join(f"{name}={path}" for name, path in names.items())
    mixed_file = write_rows(tmp_path / "mixed.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    mixing = start_cli("predict-mixed", f"--exports={spec}", f"--input={mixed_file}", f"--output={out}")
    references = {}  # the reference: `ipt-ds predict` on one export's rows alone, started while predict-mixed runs
    for name in ("cb", "sst"):
        own = write_rows(tmp_path / f"{name}.jsonl", [{k: v for k, v in r.items() if k != "export"}
                                                      for r in ROWS if r["export"] == name])
        references[name] = start_cli("predict", names[name], f"--input={own}",
                                     f"--output={tmp_path / f'{name}.out.jsonl'}")
    result = finish_cli(mixing)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["line"] for g in got] == [1, 2, 3, 4, 5] and [g["export"] for g in got] == [r["export"] for r in ROWS]
    assert "(shared backbone)" in result.stderr and "(own backbone)" in result.stderr  # bitfit trained the biases

    for name in ("cb", "sst"):  # shared backbone, own backbone
        ref = finish_cli(references[name])
        assert ref.returncode == 0, ref.stderr[-3000:]
        expected = [json.loads(line) for line in (tmp_path / f"{name}.out.jsonl").read_text().splitlines()]
        mine = [g for g in got if g["export"] == name]
        assert [m["prediction"] for m in mine] == [e["prediction"] for e in expected]
        torch.testing.assert_close(torch.tensor([m["scores"] for m in mine]),
                                   torch.tensor([e["scores"] for e in expected]), rtol=1e-4, atol=1e-5)
