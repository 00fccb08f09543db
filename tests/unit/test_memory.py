"""The per-rank memory estimate: its arithmetic, its activation count against what autograd saves, and the CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from ipt_ds.engine import unmap_freed_gathers
from ipt_ds.memory import MIB, Job, ModelShape, estimate, gathered_elements, saved_per_token
from tests.conftest import write_config


def shape(frozen: int = 0, trainable: int = 0, **sizes) -> ModelShape:
    """One frozen and one trainable module of the given sizes, on a 4-layer, 64-wide transformer."""
    units = tuple((((n, trains),), True) for n, trains in ((frozen, False), (trainable, True)) if n)
    defaults = dict(hidden_size=64, intermediate_size=256, num_heads=4, num_layers_with_grad=4, gated_mlp=False,
                    linear_inputs_kept=False)
    return ModelShape(units=units, **{**defaults, **sizes})


def job(**settings) -> Job:
    return Job(**{**dict(world_size=1, micro_batch_size=2, eval_batch_size=2, seq_len=16, stage=2, dtype_bytes=4),
                  **settings})


def parts(model: ModelShape, run: Job) -> dict[str, float]:
    return {p.name: p.bytes for p in estimate(model, run)}


def state_bytes(p: dict[str, float]) -> float:
    return sum(p[k] for k in ("trainable weights", "fp32 master weights", "gradients", "Adam moments"))


def test_zero3_divides_frozen_weights_by_the_world_size_and_zero2_does_not():
    model = shape(frozen=10_000_000)
    for ranks in (1, 2, 8):
        assert parts(model, job(stage=3, world_size=ranks))["frozen weights"] == 40_000_000 / ranks
        assert parts(model, job(stage=2, world_size=ranks))["frozen weights"] == 40_000_000


def test_zero3_keeps_parameters_under_the_persistence_threshold_whole():
    model = ModelShape(units=((((1000, False), (10_000_000, False)), True),), hidden_size=64, intermediate_size=256,
                       num_heads=4, num_layers_with_grad=4, gated_mlp=False, linear_inputs_kept=False)
    assert parts(model, job(stage=3, world_size=4))["frozen weights"] == 4 * (1000 + 10_000_000 / 4)


def test_zero3_releases_each_module_only_without_reuse_distance_and_prefetch():
    """As measured (tests/test_distributed.py::test_zero3_configs_release_each_frozen_module_after_use, and the scale
    study in docs/benchmarks.md): modules stay gathered until backward with either setting on, one at a time with both
    at 0 (ds_configs/zero3.json)."""
    layers = ModelShape(units=tuple((((1_000_000, False),), True) for _ in range(3)), hidden_size=64,
                        intermediate_size=256, num_heads=4, num_layers_with_grad=3, gated_mlp=False,
                        linear_inputs_kept=False)

    def gathered(**settings) -> int:
        return gathered_elements(layers, job(stage=3, world_size=2, **settings), evaluation=False)

    assert gathered(max_reuse_distance=0, prefetch_bucket_size=0) == 1_000_000
    assert gathered(max_reuse_distance=0, prefetch_bucket_size=10) == 3_000_000
    assert gathered(prefetch_bucket_size=0) == 3_000_000  # the default reuse distance (1e9) reaches every backward use
    assert gathered(max_reuse_distance=4_000_000, prefetch_bucket_size=0) == 2_000_000  # up to half the distance


FREED_BELOW_LIVE = """
import sys, torch
from ipt_ds.engine import unmap_freed_gathers
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "on":
    assert unmap_freed_gathers({"zero_optimization": {"stage": 3}})
torch.ones(2**22)  # a 16 MiB block, freed at once: glibc's own threshold grows to 16 MiB
before, gathers, saved = rss_mib(), [], []
for _ in range(64):  # a 2 MiB "gather", then a 256 KiB tensor allocated after it that stays alive, like an activation
    gathers.append(torch.ones(2**19))
    saved.append(torch.ones(2**16))
del gathers
print(rss_mib() - before)
"""


def test_zero3_on_cpu_returns_freed_gathers_below_live_tensors_to_the_kernel():
    """Run in fresh processes: the setting is process-wide. 64 freed 2 MiB blocks (128 MiB) between live 256 KiB
    tensors (16 MiB) stay in glibc's heap by default, and go back to the kernel once unmap_freed_gathers has run."""
    def kept_mib(setting: str) -> float:
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        out = subprocess.run([sys.executable, "-c", FREED_BELOW_LIVE, setting], env=env, capture_output=True,
                             text=True, check=True)
        return float(out.stdout.split()[-1])

    assert kept_mib("off") > 16 + 100 and kept_mib("on") < 16 + 8


def test_unmapping_freed_gathers_is_for_zero3_and_yields_to_the_environment(monkeypatch):
    assert not unmap_freed_gathers({"zero_optimization": {"stage": 2}})
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert not unmap_freed_gathers({"zero_optimization": {"stage": 3}})


def test_frozen_parameters_add_no_gradient_or_optimizer_bytes():
    frozen_only = parts(shape(frozen=10_000_000), job(stage=2, world_size=2))
    assert state_bytes(frozen_only) == 0 and frozen_only["gradient reduce bucket"] == 0
    with_prompt = parts(shape(frozen=10_000_000, trainable=1000), job(stage=2, world_size=2))
    assert with_prompt["Adam moments"] == 8 * 1000 / 2
    assert with_prompt["frozen weights"] == frozen_only["frozen weights"]
    assert frozen_only["optimizer step temporaries"] == 0
    assert with_prompt["optimizer step temporaries"] == 2 * 4 * 1000 / 2  # flat fp32 gradients + Adam's denominator


def test_a_cpu_run_counts_what_glibc_keeps_and_a_gpu_run_does_not():
    model = shape(frozen=10_000_000, trainable=1000)
    cpu = parts(model, job(stage=3, world_size=2))
    gpu = parts(model, job(stage=3, world_size=2, accelerator="cuda"))
    assert cpu["first step's freed gathers (ZeRO-3, CPU)"] == cpu["gathered parameters (ZeRO-3)"] > 0
    assert "first step's freed gathers (ZeRO-3, CPU)" not in gpu
    assert gpu["working memory"] < cpu["working memory"]  # one layer's temporaries instead of every layer's


@pytest.mark.parametrize(("stage", "dtype_bytes", "ranks", "bytes_per_param"), [
    (0, 4, 1, 4 + 4 + 8),          # fp32 without ZeRO: weights, gradients, Adam moments (no master copy)
    (0, 2, 1, 2 + 4 + 2 + 8),      # bf16 without ZeRO: the classic 16 bytes of mixed-precision Adam
    (2, 4, 4, 4 + (4 + 4 + 8) / 4),  # ZeRO-2: weights whole, master, gradients and moments partitioned
    (3, 4, 4, (4 + 4 + 4 + 8) / 4),  # ZeRO-3: everything partitioned
])
def test_full_finetuning_pays_for_every_parameter(stage, dtype_bytes, ranks, bytes_per_param):
    p = parts(shape(trainable=10_000_000), job(stage=stage, dtype_bytes=dtype_bytes, world_size=ranks))
    assert state_bytes(p) == pytest.approx(10_000_000 * bytes_per_param)


def test_offloading_the_optimizer_moves_its_state_to_the_host():
    model = shape(trainable=1_000_000)
    on_host = {p.name for p in estimate(model, job(stage=2, offload_optimizer=True)) if p.where == "host"}
    assert {"fp32 master weights", "gradients", "Adam moments"} <= on_host
    assert "trainable weights" not in on_host


def test_activations_scale_with_the_batch_and_the_layers_in_autograd():
    model = shape(frozen=1_000_000, trainable=100)
    base = parts(model, job(micro_batch_size=2))["activations kept for backward"]
    assert parts(model, job(micro_batch_size=4))["activations kept for backward"] == 2 * base
    late = dataclasses.replace(model, num_layers_with_grad=1)  # a prompt entering at layer 3 of 4
    assert parts(late, job(micro_batch_size=2))["activations kept for backward"] == base / 4
    probe = dataclasses.replace(model, num_layers_with_grad=0)  # nothing trainable inside the backbone
    assert parts(probe, job())["activations kept for backward"] == parts(probe, job())["working memory"] == 0
    checkpointed = dataclasses.replace(model, gradient_checkpointing=True)
    assert parts(checkpointed, job())["activations kept for backward"] == 4 * 2 * 16 * 64 * 4  # layer inputs only


@pytest.mark.parametrize("bad", [dict(world_size=0), dict(micro_batch_size=0), dict(stage=4),
                                 dict(stage=2, offload_param=True)])
def test_bad_job_settings_are_value_errors(bad):
    with pytest.raises(ValueError, match="world_size must be >= 1|batch_size must be >= 1|stage must be|needs ZeRO"):
        job(**bad)


def saved_bytes_per_layer(model: torch.nn.Module, hidden: int, num_tokens: tuple[int, int]) -> float:
    """Bytes autograd saves for one forward of `model` on embeddings with a padded mask, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, seq = num_tokens
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, -3:] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=torch.randn(batch, seq, hidden, requires_grad=True), attention_mask=mask)
    return sum(storages.values())


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("weights_train", [False, True])
def test_saved_activations_match_what_autograd_keeps(family, weights_train):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    hidden, inter, heads, batch, seq = 64, 256, 4, 2, 32
    torch.manual_seed(0)

    def build(num_layers: int) -> torch.nn.Module:
        if family == "bert":
            model = BertModel(BertConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                                         num_hidden_layers=num_layers, vocab_size=100), add_pooling_layer=False)
        else:
            model = LlamaModel(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                                           num_key_value_heads=2, num_hidden_layers=num_layers, vocab_size=100))
        return model.eval().requires_grad_(weights_train)

    # one layer = the difference between a 3-layer and a 2-layer model (embeddings and final norm cancel)
    measured = (saved_bytes_per_layer(build(3), hidden, (batch, seq)) -
                saved_bytes_per_layer(build(2), hidden, (batch, seq))) / (batch * seq)
    model = ModelShape(units=(), hidden_size=hidden, intermediate_size=inter, num_heads=heads, num_layers_with_grad=1,
                       gated_mlp=family == "llama", linear_inputs_kept=weights_train)
    # RMSNorm with a trained weight also keeps its normalized input (2H), which the estimate leaves out
    assert saved_per_token(model, job(seq_len=seq)) == pytest.approx(measured, rel=0.1)


def tiny_config(tmp_path, model_dir, **method) -> str:
    return str(write_config(tmp_path / "cfg.yaml", {
        "model": {"name_or_path": str(model_dir)},
        "method": method or {"name": "prompt_tuning", "num_virtual_tokens": 4},
        "data": {"task": "rte", "max_length": 64},
        "train": {"batch_size": 16, "micro_batch_size": 8},
    }))


def test_report_reads_the_built_model(tmp_path, tiny_bert):
    from ipt_ds.config import load_config
    from ipt_ds.memory import report

    def layers_in_autograd(**method) -> str:
        table, _, run = report(load_config(tiny_config(tmp_path, tiny_bert, **method)), world_size=2)
        return table.split(" layers in autograd")[0].rsplit("(", 1)[1], run.seq_len

    assert layers_in_autograd() == ("2", 64 + 4)  # the prompt enters at the input: every layer
    assert layers_in_autograd(name="linear_probe") == ("0", 64)  # nothing trains inside the backbone
    assert layers_in_autograd(name="lpt", layer=1, num_virtual_tokens=3) == ("1", 64 + 3)  # late prompt at layer 1 of 2
    cfg = load_config(tiny_config(tmp_path, tiny_bert))
    z2 = {p.name: p.bytes for p in report(cfg, world_size=2, stage=2)[1]}
    z3 = {p.name: p.bytes for p in report(cfg, world_size=2, stage=3)[1]}
    assert z3["frozen weights"] < 0.6 * z2["frozen weights"]
    assert z2["Adam moments"] == pytest.approx(8 * (4 * 32 + 32 * 2 + 2) / 2)  # prompt (4 x H) + linear head, 2 ranks


def test_cli_prints_the_table_and_rejects_bad_input(tmp_path, tiny_bert, capsys):
    from ipt_ds import cli

    config = tiny_config(tmp_path, tiny_bert)
    cli.estimate_memory(config, world_size=2, **{"deepspeed.config": "ds_configs/zero3.json",
                                                 "train.micro_batch_size": 4})
    out = capsys.readouterr().out
    assert "ZeRO-3" in out and "micro-batch 4 x 68" in out
    total = next(line for line in out.splitlines() if "total per rank (peak RSS)" in line)
    assert float(total.split()[-1].replace(",", "")) * MIB > 500 * MIB  # the process overhead alone is 500 MiB
    for flags, message in (({"world_size": 0}, "world_size must be >= 1"), ({"offload": "disk"}, "--offload must be"),
                           ({"stage": 5}, "stage must be 0, 1, 2 or 3")):
        with pytest.raises(SystemExit) as exit_status:
            cli.estimate_memory(config, **flags)
        assert exit_status.value.code == 2 and message in capsys.readouterr().err


def test_memory_study_reuses_measured_cells_and_writes_its_table(tmp_path, monkeypatch):
    import json

    from benchmarks import memory as study

    measured = {"peak_rss_bytes": [2**30, 2**30 - 2**20], "steps": 3, "wall_s": 1.0}
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "measured.json").write_text(json.dumps(measured))
    # The config does not exist: training it would fail, so a returned result proves the cell was skipped.
    assert study.measure(tmp_path, "cell", tmp_path / "missing.yaml", 3, need=0, wait_s=0) == measured
    monkeypatch.setattr(study, "OUT", tmp_path)
    row = {"cell": "cell", "estimate_mib": 1126.4, "micro_batch": 2, "positions": 144, "params_total": 10,
           "params_trainable": 1, "estimate_parts_mib": {"frozen weights": 1126.4}, "measured_mib": [1024.0, 1023.0],
           "error_pct": 10.0}
    study.write_report([row, {**row, "cell": "not-run", "measured_mib": [], "error_pct": None}], "python -m ...")
    table = (tmp_path / "results.md").read_text()
    assert "| cell | 10 (1) | 2 x 144 | 1,126 | 1,024 / 1,023 | +10.0 % |" in table
    assert "| not-run |  | 2 x 144 | 1,126 | not run |  |" in table
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_nvme_parameter_offload_keeps_only_persistent_weights_and_the_swap_buffers_in_memory():
    from ipt_ds.memory import in_memory

    model = ModelShape(units=((((40_000_000, False), (1_000, False)), True), (((64, True),), True)), hidden_size=64,
                       intermediate_size=256, num_heads=4, num_layers_with_grad=4, gated_mlp=False,
                       linear_inputs_kept=False)
    in_ram = estimate(model, job(stage=3, world_size=2, offload_param=True))
    on_disk = estimate(model, job(stage=3, world_size=2, offload_param=True, offload_param_nvme=True,
                                  nvme_swap_buffer_elements=5_000_000))
    p = {part.name: part for part in on_disk}
    assert p["weights on NVMe"].bytes == 40_000_000 * 4 / 2 and p["weights on NVMe"].where == "nvme"
    assert p["frozen weights"].bytes == 1_000 * 4 and p["trainable weights"].bytes == 64 * 4  # persistent: whole
    assert p["NVMe swap buffers"].bytes == 5_000_000 * 4 and p["NVMe swap buffers"].where == "host"
    assert in_memory(in_ram) - in_memory(on_disk) == 40_000_000 * 4 / 2 - 5_000_000 * 4
    with pytest.raises(ValueError, match="NVMe parameter offload needs offload_param"):
        job(stage=3, offload_param_nvme=True)
