"""Security properties read off the shipped code (ipt_ds/, pretrain/, benchmarks/), and the loaders that enforce them.

* every `torch.load` passes `weights_only=True` (no pickled code runs), and no `pickle` / `eval` / `exec` /
  unsafe `yaml.load`; artifacts are written with safetensors (no `torch.save` in our code);
* no shell: no `os.system` / `os.popen`, no `shell=True`, no command given as one string;
* `trust_remote_code` is never switched on in code (the config's default is off; tests/test_errors.py checks the
  default and the warning when a config turns it on).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ipt_ds.checkpoint import safe_torch_load
from tests.conftest import REPO

# benchmarks/results holds run directories, with the zero_to_fp32.py that DeepSpeed copies into every checkpoint.
SHIPPED = sorted(p for folder in ("ipt_ds", "pretrain", "benchmarks") for p in (REPO / folder).rglob("*.py")
                 if "results" not in p.relative_to(REPO).parts)
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def violations(path: Path, root: Path = REPO) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name, where = dotted(node.func), f"{path.relative_to(root)}:{node.lineno}"
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                         and keywords["weights_only"].value is True):
            found.append(f"{where}: torch.load without weights_only=True")
        if name in ("torch.save", "pickle.load", "pickle.loads", "eval", "exec", "os.system", "os.popen",
                    "yaml.load", "yaml.unsafe_load"):
            found.append(f"{where}: {name}")
        if isinstance(keywords.get("shell"), ast.Constant) and keywords["shell"].value is True:
            found.append(f"{where}: shell=True")
        if name.split(".")[-1] in SUBPROCESS_CALLS and name.startswith(("subprocess", "Popen")) and node.args \
                and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
            found.append(f"{where}: a command given as one string")
        if isinstance(keywords.get("trust_remote_code"), ast.Constant) and keywords["trust_remote_code"].value:
            found.append(f"{where}: trust_remote_code switched on")
    return found


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess, torch\ntorch.load('x')\nos.system('ls')\n"
                   "subprocess.run(f'ls {x}', shell=True)\nf(trust_remote_code=True)\n")
    assert [p.split(": ", 1)[1] for p in violations(bad, tmp_path)] == [
        "torch.load without weights_only=True", "os.system", "shell=True", "a command given as one string",
        "trust_remote_code switched on"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_code_loads_no_pickled_code_and_runs_no_shell(path):
    assert violations(path) == []


class RunsCode:
    """Unpickling this would create a file (what a malicious checkpoint would do instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_checkpoint_file_that_pickles_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"module": {"w": torch.ones(2)}, "payload": RunsCode(marker)}, tmp_path / "model_states.pt")
    with pytest.raises(ValueError, match="holds objects other than tensors and DeepSpeed records"):
        safe_torch_load(tmp_path / "model_states.pt")
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, tmp_path / "plain.pt")
    assert safe_torch_load(tmp_path / "plain.pt")["step"] == 3


def test_nothing_read_from_a_file_switches_on_remote_code(tmp_path, tiny_bert, monkeypatch):
    """A YAML or an export's config.json that sets model.trust_remote_code is refused before any model code is
    loaded (evaluate, predict and predict-mixed read the export); only the command line's flag turns it on."""
    import json

    from safetensors.torch import save_file

    from ipt_ds import infer, mixed, model
    from ipt_ds.config import load_config
    from ipt_ds.confload import ConfigError

    loaded = []
    monkeypatch.setattr(model, "load_backbone", lambda *args, **kwargs: loaded.append(args) or 1 / 0)
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(f"model:\n  name_or_path: {tiny_bert}\n  trust_remote_code: true\n")
    with pytest.raises(ConfigError, match=rf"{yaml_file}:3: model.trust_remote_code is set to true in the file; "
                                          "remote code runs only when the command line asks for it: pass "
                                          "--model.trust_remote_code=true"):
        load_config(yaml_file)
    assert load_config(yaml_file, {"model.trust_remote_code": "true"}).model.trust_remote_code is True
    assert load_config(yaml_file, {"model.trust_remote_code": "false"}).model.trust_remote_code is False

    export = tmp_path / "best"
    export.mkdir()
    config = {"model": {"name_or_path": str(tiny_bert), "trust_remote_code": True}, "data": {"task": "rte"}}
    (export / "config.json").write_text(json.dumps({"config": config, "ds_config": {}}))
    save_file({"head.linear.weight": torch.zeros(2, 32)}, export / "model.safetensors")
    refused = rf"{export}/config.json: model.trust_remote_code is set to true in the file"
    with pytest.raises(ValueError, match=refused):
        infer.load_for_inference(str(export), {})
    with pytest.raises(ValueError, match=refused):
        mixed.load_routes({"rte": str(export)})
    assert loaded == [], "no backbone may be loaded before the refusal"
