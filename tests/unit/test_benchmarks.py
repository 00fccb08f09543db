"""Study scripts: table assembly from cell results, and resumed studies reusing finished cells (no process runs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks import accuracy, e2e, peft_reference, peft_speed, scale, step_cost, table


def cell(eval_acc: float, test_acc: float | None = None) -> dict:
    result = {"task": "cb", "method": "lpt", "eval": {"acc": eval_acc}, "eval_majority_acc": 50.0,
              "parameters": {"trainable": 1234}}
    if test_acc is not None:
        result |= {"test": {"acc": test_acc}, "test_majority_acc": 60.0}
    return result


def test_accuracy_table_reports_the_test_split_when_there_is_one(tmp_path):
    rows = accuracy.summarize({"cb/a": [cell(70.0), cell(74.0)], "sst2/b": [cell(90.0, 80.0), cell(95.0, 84.0)]})
    assert rows[0]["split"] == "eval" and rows[0]["mean"] == pytest.approx(72.0)
    assert rows[0]["sd"] == pytest.approx(2.8284, rel=1e-4) and rows[0]["baseline"] == 50.0
    assert rows[1]["split"] == "test" and rows[1]["mean"] == pytest.approx(82.0) and rows[1]["baseline"] == 60.0
    accuracy.write_report(tmp_path, rows, "python -m benchmarks.accuracy ...")
    table = (tmp_path / "results.md").read_text()
    assert "| cb/a | cb | lpt | 1,234 | eval | acc | 72.0 ± 2.8 | 2 | 50.0 |" in table
    assert "| sst2/b | cb | lpt | 1,234 | test | acc | 82.0 ± 2.8 | 2 | 60.0 |" in table
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert (tmp_path / "results.png").stat().st_size > 0


def test_accuracy_report_puts_each_metric_beside_its_own_baseline_also_for_regression(tmp_path):
    """A paraphrase task scored in F1 gets the always-positive F1 beside it, not the majority class's accuracy; a
    regression task (correlations, no majority class) is reported without a crash."""
    def f1_run(f1: float) -> dict:
        return {"task": "mrpc", "method": "lpt", "eval": {"f1": f1, "acc": 70.0}, "eval_majority_acc": 68.4,
                "eval_baseline": {"f1": 81.2, "acc": 68.4}, "parameters": {"trainable": 10}}

    def stsb_run(pearson: float) -> dict:
        return {"task": "stsb", "method": "lpt", "eval": {"pearson": pearson, "spearman": 50.0},
                "eval_baseline": {"pearson": 0.0, "spearman": 0.0}, "parameters": {"trainable": 10}}

    old_stsb = {"task": "stsb", "method": "lpt", "eval": {"pearson": 60.0}, "parameters": {"trainable": 10}}
    rows = accuracy.summarize({"mrpc/a": [f1_run(69.9), f1_run(70.1)], "stsb/a": [stsb_run(60.0), stsb_run(62.0)],
                               "stsb/old": [old_stsb]})
    assert [r["baseline"] for r in rows] == [81.2, 0.0, None]
    accuracy.write_report(tmp_path, rows, "python -m benchmarks.accuracy ...")
    text = (tmp_path / "results.md").read_text()
    assert "| mrpc/a | mrpc | lpt | 10 | eval | f1 | 70.0 ± 0.1 | 2 | 81.2 |" in text
    assert "| stsb/a | stsb | lpt | 10 | eval | pearson | 61.0 ± 1.4 | 2 | 0.0 |" in text
    assert "| stsb/old | stsb | lpt | 10 | eval | pearson | 60.0 ± 0.0 | 1 | - |" in text


def test_accuracy_study_reuses_finished_cells(tmp_path):
    run = tmp_path / "runs" / "cb-missing-seed7"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(cell(66.0)))
    # The config does not exist: training it would fail, so a returned result proves the cell was skipped.
    assert accuracy.run_cell(tmp_path, Path("configs/cb/missing.yaml"), 7, 1, [])["eval"]["acc"] == 66.0


def test_methods_by_tasks_table_takes_each_cell_from_its_study(tmp_path):
    cb = accuracy.summarize({"cb/a": [cell(70.0), cell(74.0)], "cb/b": [cell(60.0), cell(60.0)]})
    sst2 = accuracy.summarize({"cb/a": [cell(90.0, 80.0), cell(95.0, 84.0)]})
    assembled = table.assemble({"full_cb": cb, "lmbff_sst2": sst2})
    a, b = assembled["rows"]
    assert a["cells"]["lmbff_sst2"]["mean"] == pytest.approx(82.0) and a["mean"] == pytest.approx(77.0)
    assert b["cells"]["lmbff_sst2"] is None and b["mean"] is None  # no average over a partial row
    table.write_report(tmp_path, assembled, "python -m benchmarks.table ...")
    text = (tmp_path / "results.md").read_text()
    assert "| config | full_cb<br>cb eval acc | lmbff_sst2<br>cb test acc | mean |" in text
    assert "| cb/a | 72.0 ± 2.8 | 82.0 ± 2.8 | 77.0 |" in text and "| cb/b | 60.0 ± 0.0 | - | - |" in text
    assert "| baseline (one constant answer) | 50.0 | 60.0 | 55.0 |" in text
    assert (tmp_path / "results.png").stat().st_size > 0


def step(label: str, repeat: int, seconds: float, peak: float, busy: bool = False) -> dict:
    return {"label": label, "repeat": repeat, "step_s": seconds, "peak_rss_mib": peak, "start_rss_mib": 100.0,
            "trainable": 10, "useful_flops_per_s": 40e9 / seconds, "oversubscribed": busy}


def test_step_cost_ratios_are_taken_within_each_repeat():
    # Repeat 1 ran on a machine twice as slow: ratios within a repeat stay 0.5, a ratio of medians would not.
    results = [step("base", 0, 1.0, 300.0), step("lpt", 0, 0.5, 200.0),
               step("base", 1, 2.0, 300.0), step("lpt", 1, 1.0, 250.0, busy=True)]
    time_ratio = step_cost.ratios(results, "step_s", "base")
    assert time_ratio["lpt"] == (pytest.approx(0.5), pytest.approx(0.0))
    assert time_ratio["base"] == (1.0, 0.0)
    peak_ratio = step_cost.ratios(results, "peak_rss_mib", "base")["lpt"]
    assert peak_ratio == (pytest.approx(0.75), pytest.approx(1 / 12))
    lines = step_cost.table(results, "base", gemm_rate=100e9)
    assert lines[2] == "| base | 10 | 1.500 | 1.00 ± 0.00 | 300 | 1.00 ± 0.00 | 30.0 | 0.30 |"
    assert lines[3] == "| lpt* | 10 | 0.750 | 0.50 ± 0.00 | 225 | 0.75 ± 0.08 | 60.0 | 0.60 |"


def test_step_cost_study_reuses_finished_cells(tmp_path):
    done = {"id": "x-lpt-r0", "step_s": 0.25}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x-lpt-r0.json").write_text(json.dumps(done))
    assert step_cost.run_cell(tmp_path, {"id": "x-lpt-r0", "backbone": "does-not-exist"}, cores=[0]) == done


@pytest.mark.parametrize(("method", "first_trained", "weights_train"), [
    ({"method.name": "prompt_tuning", "method.num_virtual_tokens": 3}, 0, False),
    ({"method.name": "lpt", "method.num_virtual_tokens": 3, "method.layer": 1}, 1, False),
    ({"method.name": "full"}, 0, True)])
def test_useful_flops_count_each_layer_as_the_method_runs_it(method, first_trained, weights_train, tiny_models):
    """Against the count written out by hand for a 2-layer LLaMA: N = q, k, v, o and the gated MLP's weights."""
    import torch

    from ipt_ds.config import load_config
    from ipt_ds.data.tasks import get_task
    from ipt_ds.model import build_model

    cfg = load_config(None, {"model.name_or_path": str(tiny_models["llama"]), **method})
    model, _ = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
    config = model.backbone.model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    n = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    tokens, prompt = 10, 3 if "method.num_virtual_tokens" in method else 0
    below = tokens + (prompt if method["method.name"] == "prompt_tuning" else 0)
    above = tokens + prompt
    expected = first_trained * (2 * n * below + 4 * below**2 * hidden) + (2 - first_trained) * (
        (6 if weights_train else 4) * n * above + 12 * above**2 * hidden)
    assert step_cost.useful_flops(model, batch_size=2, seq_len=tokens) == 2 * expected


def test_a_cell_run_beside_more_busy_threads_than_cpus_is_marked_oversubscribed(tmp_path):
    """benchmarks/hygiene.py: the cell's own record holds the load it ran under."""
    import os
    import subprocess
    import sys

    from benchmarks import hygiene

    spin = [sys.executable, "-c", "import time\nend = time.time() + 6\nwhile time.time() < end: pass"]
    busy = [subprocess.Popen(spin) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        time.sleep(0.5)
        run = hygiene.run_watched([sys.executable, "-c", "import time; time.sleep(2); print('done')"], cores=[0],
                                  log=tmp_path / "cell.log")
    finally:
        for process in busy:
            process.kill()
    assert run["returncode"] == 0 and run["stdout"].strip() == "done" and run["threads"] == 1
    assert run["oversubscribed"] and run["runnable_threads"] > hygiene.OVERSUBSCRIBED * os.cpu_count()
    assert len(run["load_average"]) == 2 and run["peak_rss_mib"] > 0


def test_sweep_accuracy_groups_finished_runs_by_insertion_layer(tmp_path):
    for name, layer, acc in [("a", 1, 70.0), ("b", 1, 74.0), ("c", 3, 80.0), ("unfinished", 5, None)]:
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"method:\n  name: lpt\n  layer: {layer}\n")
        if acc is not None:
            (run / "results.json").write_text(json.dumps({"eval": {"acc": acc}}))
    assert step_cost.accuracy_by_layer(sorted(tmp_path.iterdir())) == {1: [70.0, 74.0], 3: [80.0]}


def reference_cell(acc: float) -> dict:
    return {"task": "cb", "method": "prefix", "eval": {"acc": acc}, "eval_majority_acc": 50.0,
            "parameters": {"trainable": 1287811}}


def test_peft_reference_table_puts_both_rows_side_by_side(tmp_path):
    peft = {"prefix": peft_reference.summarize([reference_cell(70.0), reference_cell(74.0)])}
    ours = {"prefix": accuracy.summarize({"cb/prefix_minilm": [reference_cell(72.0), reference_cell(72.0)]})[0]}
    lines = peft_reference.combined_table(ours, peft)
    assert lines[2] == ("| prefix | cb/prefix_minilm | 1,287,811 | 72.0 ± 0.0 (2) | PrefixTuningConfig (projection) | "
                        "1,287,811 | 72.0 ± 2.8 (2) | +0.0 |")
    peft_reference.write_report(tmp_path, ours, peft, "python -m benchmarks.peft_reference ...")
    assert lines[2] in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["peft"]["prefix"]["scores"] == [70.0, 74.0]
    assert (tmp_path / "results.png").stat().st_size > 0


def test_peft_reference_reuses_finished_cells_on_both_sides(tmp_path):
    run = tmp_path / "runs" / "peft-prefix-seed7"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(reference_cell(66.0)))
    assert peft_reference.run_cell(tmp_path, "prefix", 7, epochs=3)["eval"]["acc"] == 66.0
    # Ours: a method the accuracy study lacks comes from this study's own cached cells (no training when present).
    ours = tmp_path / "ours" / "runs" / "cb-full_minilm-seed7"
    ours.mkdir(parents=True)
    (ours / "results.json").write_text(json.dumps(reference_cell(71.0)))
    study = tmp_path / "accuracy.json"
    study.write_text(json.dumps([{"config": "cb/prefix_minilm", "mean": 72.0}]))
    rows = peft_reference.our_rows(tmp_path, ["prefix", "full"], [7], 3, study)
    assert rows["prefix"]["mean"] == 72.0 and rows["full"]["mean"] == 71.0


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "full"])
def test_peft_reference_model_is_ours_given_the_same_weights(tiny_bert, method):
    """PEFT's wrapper and our model compute the same logits from the same weights: the heads match (mean over the
    real tokens), and so do where the prompt goes and how the prefix table is laid out."""
    import torch

    from benchmarks import peft_trainer
    from ipt_ds.config import load_config
    from ipt_ds.data.encode import collate
    from ipt_ds.data.tasks import Example, get_task
    from ipt_ds.model import build_model

    torch.manual_seed(0)
    cfg = load_config(Path(peft_reference.CONFIGS[method]), {"model.name_or_path": str(tiny_bert)})
    task = get_task("cb")
    ours, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    theirs, _ = peft_trainer.build_model(cfg, len(task.label_names))
    copies = {"head.linear": "classifier"}
    if method == "prompt_tuning":
        copies |= {"method.prompt": "prompt_encoder.default.embedding.weight"}
    if method == "prefix":
        copies |= {"method.embedding": "prompt_encoder.default.embedding.weight",
                   "method.mlp.0": "prompt_encoder.default.transform.0",
                   "method.mlp.2": "prompt_encoder.default.transform.2"}
    # PEFT keeps a frozen original of the head and trains a copy under modules_to_save.
    their_params = {name.replace("modules_to_save.default.", ""): p for name, p in theirs.named_parameters()
                    if "original_module" not in name}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            for mine, target in copies.items():
                if name.startswith(mine):
                    suffix = target + name[len(mine):]
                    (theirs_p,) = [q for key, q in their_params.items() if key.endswith(suffix)]
                    theirs_p.copy_(p)
    examples = [Example(guid=str(i), text_a=a, text_b=b, label=0) for i, (a, b) in
                enumerate([("the cat sat on the mat", "a cat sat"), ("dogs bark", "the dog is loud and barks often")])]
    batch = collate([encoder(e) for e in examples], encoder.tokenizer.pad_token_id)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        mine, _ = ours(batch)
        other = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
    torch.testing.assert_close(other, mine, rtol=1e-5, atol=1e-5)


SENTENCES = ["a gripping, funny film", "dull", "the plot wanders for two hours and never finds its way home"]


def verbalizer_batch(encoder, labels=(1, 0, 1)) -> dict:
    """Right-padded SST-2-style inputs of three lengths, encoded by our verbalizer encoder."""
    from ipt_ds.data.encode import collate
    from ipt_ds.data.tasks import Example

    examples = [Example(guid=str(i), text_a=text, text_b=None, label=label)
                for i, (text, label) in enumerate(zip(SENTENCES, labels))]
    return collate([encoder(e) for e in examples], encoder.tokenizer.pad_token_id)


def smollm2_config(tiny_llama: Path, method: str):
    from ipt_ds.config import load_config

    return load_config(Path(f"configs/sst2/{method}_smollm2.yaml"), {"model.name_or_path": str(tiny_llama)})


def test_peft_verbalizer_scores_the_label_words_at_the_last_real_token(tiny_models):
    """Without virtual tokens, the wrapper's class scores are the causal LM's logits of the label words at the last
    real token of each right-padded row, the same as for that row run alone; its loss is our full-vocabulary one."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from benchmarks.peft_trainer import VerbalizerClassifier
    from ipt_ds.data.encode import TextEncoder, label_token_ids
    from ipt_ds.data.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    cfg = smollm2_config(tiny_models["llama"], "prompt_tuning")
    encoder = TextEncoder(tokenizer=tokenizer, task=get_task("sst2"), max_length=96, template=cfg.head.template,
                          decoder=True)
    words = label_token_ids(tokenizer, cfg.head.label_words)
    wrapper = VerbalizerClassifier.from_pretrained(tiny_models["llama"], label_token_ids=words).eval()
    causal = LlamaForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    batch = verbalizer_batch(encoder)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3 and (batch["label_position"] == lengths - 1).all()
    with torch.no_grad():
        out = wrapper(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        alone = torch.stack([causal(input_ids=batch["input_ids"][i : i + 1, :n]).logits[0, -1]
                             for i, n in enumerate(lengths.tolist())])  # (B, V)
    torch.testing.assert_close(out.logits, alone[:, words], rtol=1e-5, atol=1e-5)
    gold = torch.tensor(words)[batch["labels"]]
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(alone, gold), rtol=1e-5, atol=1e-5)


def test_peft_prompt_tuning_reads_the_last_real_token_behind_the_virtual_tokens(tiny_models):
    """Under PEFT's prompt tuning the class scores are the causal LM's, run on [prompt vectors; token embeddings] of
    each row alone, at its last real token: the P virtual positions in front are counted, the padding is not."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks import peft_trainer
    from ipt_ds.data.encode import TextEncoder, label_token_ids
    from ipt_ds.data.tasks import get_task

    torch.manual_seed(0)
    cfg = smollm2_config(tiny_models["llama"], "prompt_tuning")
    peft, tokenizer = peft_trainer.build_model(cfg, 2)
    encoder = TextEncoder(tokenizer=tokenizer, task=get_task("sst2"), max_length=96, template=cfg.head.template,
                          decoder=True)
    words = label_token_ids(tokenizer, cfg.head.label_words)
    causal = LlamaForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    batch = verbalizer_batch(encoder)
    peft.eval()
    with torch.no_grad():
        scores = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        prompt = peft.get_prompt(batch_size=1)[0]  # (P, H)
        assert prompt.shape[0] == cfg.method.num_virtual_tokens
        expected = []
        for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
            embeds = causal.get_input_embeddings()(batch["input_ids"][i, :n])  # (n, H)
            expected.append(causal(inputs_embeds=torch.cat([prompt, embeds])[None]).logits[0, -1, words])
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_peft_verbalizer_model_is_ours_given_the_same_weights(tiny_models, method):
    """On a LLaMA-class decoder with our verbalizer head, PEFT's model and ours give the same label-word logits and
    the same loss from the same trained tensors: same inputs, label words, position read, prompt / prefix layout."""
    import torch

    from benchmarks import peft_trainer
    from ipt_ds.data.tasks import get_task
    from ipt_ds.model import build_model

    torch.manual_seed(0)
    cfg = smollm2_config(tiny_models["llama"], method)
    ours, encoder = build_model(cfg, get_task("sst2"), dtype=torch.float32, ds_config=None)
    theirs, _ = peft_trainer.build_model(cfg, 2)
    copies = {"method.prompt": "prompt_encoder.default.embedding.weight"} if method == "prompt_tuning" else {
        "method.embedding": "prompt_encoder.default.embedding.weight",
        "method.mlp.0": "prompt_encoder.default.transform.0", "method.mlp.2": "prompt_encoder.default.transform.2"}
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        if method == "prefix":
            # Under grouped-query attention PEFT's prefix embedding is kv_heads x head_dim wide (16 here), ours the
            # hidden size (32): with our columns beyond PEFT's zeroed, the first Linear's first 16 input columns
            # make the same prefix table.
            ours.method.embedding[:, their_params[copies["method.embedding"]].shape[1]:] = 0
        for name, p in ours.named_parameters():
            for mine, target in copies.items():
                if name.startswith(mine):
                    theirs_p = their_params[target + name[len(mine):]]
                    theirs_p.copy_(p[tuple(slice(0, n) for n in theirs_p.shape)])
    batch = verbalizer_batch(encoder)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        mine, my_loss = ours(batch)
        other = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(other.logits, mine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other.loss, my_loss, rtol=1e-5, atol=1e-5)


def test_peft_trainer_reports_the_test_split_with_the_best_dev_epoch(tiny_models, tmp_path):
    """LM-BFF protocol on the real SST-2 16-shot files (data seed 21): dev after every epoch, the test split scored
    once with the best epoch's tensors (train() checks that they score dev as that epoch did), in the result shape
    that the accuracy study summarizes next to ours."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks import peft_trainer

    # Weights drawn wide (std 0.5): at transformers' 0.02 a tiny decoder answers one class whatever the prompt, and
    # every epoch would tie. With these, dev accuracy moves (50, 56.25, 50, 50): the last epoch is not the best.
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, initializer_range=0.5)).save_pretrained(
        tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cell = {"config": "configs/sst2/prompt_tuning_smollm2.yaml", "seed": 1, "data_seed": 21, "epochs": 4,
            "overrides": {"model.name_or_path": str(tmp_path / "model"), "optim.lr": "0.1"},
            "output_dir": str(tmp_path / "trainer")}
    result = peft_trainer.train(cell)
    assert result["eval"]["acc"] == max(result["evals"]) > result["evals"][-1]
    assert 0 <= result["test"]["acc"] <= 100 and result["parameters"]["trainable"] == 8 * 32
    row = accuracy.summarize({"peft/sst2/prompt_tuning_smollm2": [result]})[0]
    assert (row["split"], row["mean"], row["baseline"]) == ("test", result["test"]["acc"], result["test_majority_acc"])


def test_accuracy_study_runs_the_peft_rows_of_configs_that_have_one(tmp_path):
    """`--peft` rows: prompt methods and linear-head full fine-tuning have a PEFT counterpart, our own methods do not;
    a PEFT cell whose results.json exists is read, not run again."""
    assert accuracy.has_peft_counterpart(Path("configs/sst2/prefix_smollm2.yaml"))
    assert accuracy.has_peft_counterpart(Path("configs/cb/full_minilm.yaml"))
    assert not accuracy.has_peft_counterpart(Path("configs/sst2/ipt_cnn_smollm2.yaml"))
    run = tmp_path / "runs" / "peft-sst2-missing-seed7-data13"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(cell(70.0, 66.0)))
    # The config does not exist: running it would fail, so a returned result proves the cell was skipped.
    result = accuracy.run_peft_cell(tmp_path, Path("configs/sst2/missing.yaml"), 7, ["--train.epochs=3"], 13)
    assert result["test"]["acc"] == 66.0


def test_peft_speed_table_takes_ratios_within_each_repeat(tmp_path):
    def speed(label, repeat, rate, peak):
        return {"label": label, "repeat": repeat, "method": "prefix", "samples_per_s": rate, "peak_rss_mib": peak,
                "trainable": 10, "padded_tokens_per_sample": 80.0 if label == "peft" else 120.0}

    # Repeat 1 ran on a machine half as fast: the within-repeat ratios stay 1.5 and 2.0.
    results = [speed("ours", 0, 6.0, 900.0), speed("peft", 0, 4.0, 1000.0), speed("peft_default", 0, 3.0, 1100.0),
               speed("peft_default", 1, 1.5, 1100.0), speed("peft", 1, 2.0, 1000.0), speed("ours", 1, 3.0, 800.0)]
    lines = peft_speed.table(results)
    assert lines[2] == "| prefix | 10 | samples/s | 4.50 | 3.00 | 1.50 ± 0.00 | 2.25 | 2.00 ± 0.00 | 2 |"
    assert lines[3] == "| prefix | 10 | peak RSS (MiB) | 850 | 1,000 | 0.85 ± 0.05 | 1,100 | 0.77 ± 0.05 | 2 |"
    assert peft_speed.padding(results).endswith("our batches 80.0, the Trainer's default batches 120.0")
    log = tmp_path / "log.jsonl"  # windows of equal samples: the rate over both is their harmonic mean
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 10, "train/samples_per_s": 100.0},
                                                         {"step": 20, "train/samples_per_s": 2.0},
                                                         {"step": 20, "eval/acc": 50.0},
                                                         {"step": 30, "train/samples_per_s": 6.0}]))
    assert peft_speed.logged_rate(log, window=10) == pytest.approx(3.0)


def test_peft_speed_reuses_finished_cells(tmp_path):
    done = {"id": "prefix-ours-s30-w10-r0", "samples_per_s": 5.0}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "prefix-ours-s30-w10-r0.json").write_text(json.dumps(done))
    assert peft_speed.run_cell(tmp_path, {"id": "prefix-ours-s30-w10-r0", "method": "missing"}) == done


def scale_measurement(step_s: list[float], peaks_mib: list[float]) -> dict:
    return {"step_s": step_s, "peak_rss_bytes": [m * 2**20 for m in peaks_mib], "wall_s": 60.0,
            "parameters": {"total": 1_000_000, "trainable": 100}, "nvme_swap_bytes": 2**30,
            "gemm": {"shapes": {"square": {"flops_per_s": 100e9}, "MLP": {"flops_per_s": 80e9}}}}


def test_scale_flop_count_is_the_frozen_backbone_formula():
    # tiny: H 64, I 128, 2 layers, 4 heads of 16, 2 kv heads: q, o 64x64 each, k, v 64x32 each, MLP 3 x 64x128
    assert scale.matmul_params("tiny") == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    # 2 sequences of 72 positions: 4 N T + 12 L T^2 D each
    assert scale.step_flops("tiny", sequences=2, positions=72) == 2 * (4 * 73_728 * 72 + 12 * 2 * 72**2 * 64)
    # LLaMA-7B's layers hold 6.48B parameters of matrix products
    assert scale.matmul_params("7b") == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def test_scale_tables_put_estimate_measurement_and_efficiency_side_by_side(tmp_path):
    estimates = {cell: {"per_rank_bytes": mib * 2**20, "positions": 72, "parts_mib": {"frozen weights": mib}}
                 for cell, mib in (("tiny", 550.0), ("7b", 14_000.0), ("tiny-nvme", 500.0))}
    measured = {"tiny": scale_measurement([3.0, 1.0, 2.0], [500.0, 480.0]),
                "7b": {"skipped": "needs 29.0 GiB (estimate x 2 ranks + margin), 20.0 GiB available"},
                "tiny-nvme": scale_measurement([4.0], [400.0, 410.0])}
    rows = scale.build_rows(["tiny", "7b", "tiny-nvme"], estimates, measured, world=2)
    flops = scale.step_flops("tiny", sequences=2, positions=72)
    assert rows[0]["step_s"] == 2.0 and rows[0]["achieved_flops_per_s"] == pytest.approx(flops / 2.0)
    assert rows[0]["fraction_of_gemm_peak"] == pytest.approx(flops / 2.0 / 100e9)
    assert rows[0]["estimate_error_pct"] == pytest.approx(10.0)  # (550 - 500) / 500
    assert rows[1]["status"].startswith("needs 29.0 GiB") and "step_s" not in rows[1]
    assert rows[2]["weights"] == "NVMe" and rows[2]["nvme_swap_gib"] == 1.0
    lines = scale.scale_table(rows)
    assert lines[2] == ("| tiny | a tiny LLaMA (tests of this script) | 1,000,000 (100) | memory | "
                        "mmap threshold 1 MiB | 550 | 500 / 480 | +10.0 % | 2.00 | 60 |")
    assert lines[3].startswith("| 7b | LLaMA-7B / Llama-2-7B | | memory | mmap threshold 1 MiB | 14,000 | not run: "
                               "needs 29.0 GiB")
    efficiency = scale.efficiency_table(rows)
    assert len(efficiency) == 4  # the cell that did not run has no efficiency row
    assert efficiency[2].endswith(f"| 2.00 | {flops / 2e9:,.1f} | 100.0 | 80.0 | 0 % |")
    scale.write_report(tmp_path, rows, "python -m benchmarks.scale ...", world=2, device="cpu")
    report = (tmp_path / "results.md").read_text()
    assert lines[2] in report and "Largest backbone trained with its weights in memory: tiny " in report
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["cell"] == "7b"
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_scale_study_reuses_finished_cells_and_retries_skipped_ones(tmp_path):
    done = scale_measurement([1.0], [100.0, 100.0])
    (tmp_path / "1b").mkdir()
    (tmp_path / "1b" / "measured.json").write_text(json.dumps(done))
    # The config does not exist and no machine has this much memory: a result proves nothing ran.
    missing = tmp_path / "missing.yaml"
    assert scale.run_cell(tmp_path, "1b", missing, world=2, device="cpu", need=1e18, wait_s=0) == done
    skipped = scale.run_cell(tmp_path, "3b", missing, world=2, device="cpu", need=1e18, wait_s=0)
    assert skipped["skipped"].startswith("needs 931322574.6 GiB")
    assert not (tmp_path / "3b" / "measured.json").exists()  # a skipped cell runs on the next invocation


def test_scale_nvme_buffers_hold_the_largest_partition(tmp_path):
    config = scale.ds_config("7b", nvme_dir=tmp_path, world=2, bf16=False)
    swap = config["zero_optimization"]["offload_param"]
    assert swap["device"] == "nvme" and swap["buffer_size"] >= 49_152 * 4096 // 2
    assert "offload_param" not in scale.ds_config("7b", nvme_dir=None, world=2, bf16=False)["zero_optimization"]
    assert scale.parse_cell("7b-nvme-glibc") == ("7b", True, True) and scale.parse_cell("1b") == ("1b", False, False)
    for bad in ("7b-disk", "8b", "7b-nvme-nvme"):
        with pytest.raises(ValueError, match=bad):
            scale.parse_cell(bad)


def generation_cell(method: str, bleu: float, rouge: float) -> dict:
    scores = {"bleu": bleu, "rouge_l": rouge}
    return {"task": "e2e", "method": method, "eval": scores, "test": scores, "parameters": {"trainable": 99}}


def test_e2e_table_puts_both_metrics_of_every_method_side_by_side(tmp_path):
    rows = e2e.summarize({"zero-shot": [generation_cell("zero-shot", 5.0, 30.0)],
                          "e2e/prefix": [generation_cell("prefix", 50.0, 60.0), generation_cell("prefix", 54.0, 62.0)]})
    assert rows[1]["test_bleu"]["mean"] == pytest.approx(52.0)
    assert rows[1]["test_rouge_l"]["sd"] == pytest.approx(1.4142, rel=1e-4)
    e2e.write_report(tmp_path, rows, "python -m benchmarks.e2e")
    table = (tmp_path / "results.md").read_text()
    assert "| zero-shot | zero-shot | 99 | 5.0 ± 0.0 | 30.0 ± 0.0 | 5.0 ± 0.0 | 30.0 ± 0.0 | 1 |" in table
    assert "| e2e/prefix | prefix | 99 | 52.0 ± 2.8 | 61.0 ± 1.4 | 52.0 ± 2.8 | 61.0 ± 1.4 | 2 |" in table
    assert (tmp_path / "results.png").stat().st_size > 0


def test_e2e_zero_shot_cell_is_reused(tmp_path):
    run = tmp_path / "runs" / "zero-shot"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(generation_cell("zero-shot", 7.0, 31.0)))
    # The config does not exist: decoding would fail, so a returned result proves the cell was skipped.
    assert e2e.zero_shot_cell(tmp_path, Path("configs/e2e/missing.yaml"), [])["test"]["bleu"] == 7.0


def test_speed_study_splits_epochs_and_reports_each_target_met_or_not():
    """benchmarks/speed.py: epoch 1 apart from the later epochs; the cached method's later epochs count only the
    layers that run; every target with its figure."""
    from benchmarks import speed

    def cell(method, arm, windows, rss):
        return {"backbone": "minilm", "method": method, "arm": arm, "repeat": 0, "peak_rss_mib": rss,
                "load_average": [0.1, 0.1], "runnable_threads": 1.0, "oversubscribed": False, "windows": windows}

    def work(peft, cached=False):
        return {"flops_per_sample": 10e9, "flops_per_sample_cached": 1e9 if cached else 10e9, "cached": cached,
                "peft": peft}

    epochs = lambda *seconds: [{"samples": 100, "seconds": s} for s in seconds]  # noqa: E731
    works = {"minilm": {"prompt_tuning": work(True), "ptuning_v2": work(True), "lpt": work(False, cached=True),
                        "linear_probe": work(False, cached=True), "full": work(True)}}
    cells = [cell("prompt_tuning", "ours", epochs(4, 1, 1), 900), cell("prompt_tuning", "peft", epochs(2, 2, 2), 1000),
             cell("prompt_tuning", "peft_default", epochs(2, 2, 2), 1000),
             cell("ptuning_v2", "ours", epochs(2, 2, 2), 1000), cell("ptuning_v2", "peft", epochs(2, 2, 2), 1000),
             cell("ptuning_v2", "peft_default", epochs(2, 2, 2), 1000),
             cell("lpt", "ours", epochs(9, 0.5, 0.5), 600), cell("linear_probe", "ours", epochs(9, 0.1, 0.1), 500),
             cell("full", "ours", epochs(4, 4, 4), 1500), cell("full", "kernel", epochs(3, 3, 3), 1400),
             cell("full", "peft", epochs(2, 2, 2), 1000),
             cell("full", "peft_default", epochs(2, 2, 2), 1000)]
    rows = [row for c in cells for row in speed.phase_rows(c, works["minilm"][c["method"]], gemm_rate=1000e9)]
    first, later = [r for r in rows if r["method"] == "prompt_tuning" and r["arm"] == "ours"]
    assert (first["phase"], first["samples_per_s"], later["samples_per_s"]) == ("first", 25.0, 100.0)
    assert later["fraction_of_gemm"] == pytest.approx(100 * 10e9 / 1000e9)
    lpt_later = next(r for r in rows if r["method"] == "lpt" and r["phase"] == "later")
    assert lpt_later["useful_flops_per_s"] == pytest.approx(200 * 1e9), "the cached layers are not counted"
    table, targets = speed.report(rows, works)
    assert "| prompt_tuning | peft | 50.00 | 50.00 | 2.00 | 1,000 | 0.90 | 500.0 | 0.50 |" in table
    assert "| minilm prompt_tuning: samples/s ≥ 1.0x peft | 2.00 | met |" in targets
    assert "| minilm full: samples/s ≥ 1.0x peft | 0.50 | not met |" in targets
    assert "| minilm full: peak RSS ≤ 1.0x PEFT on our batches | 1.50 | not met |" in targets
    assert "| minilm LPT from epoch 2: samples/s ≥ 2x P-tuning v2 | 4.00 | met |" in targets
    assert "| minilm LPT: peak RSS ≤ 0.7x P-tuning v2 | 0.60 | met |" in targets
    assert "| minilm linear probe from epoch 2: samples/s ≥ 10x full fine-tuning | 40.00 | met |" in targets
    assert "| minilm prompt_tuning: useful FLOP/s ≥ 0.70 of the GEMM rate | 1.00 | met |" in targets
    assert "| full | kernel | 33.33 | 33.33 | 0.75 | 1,400 | 1.07 | 333.3 | 0.33 |" in table
    assert "| minilm full: samples/s ≥ 0.9x the step kernel's | 0.75 | not met |" in targets
    table, targets = speed.report([r for r in rows if r["arm"] != "ours"], works)  # a study without our arm
    assert "| full | kernel | 33.33 | 33.33 |  | 1,400 |  | 333.3 | 0.33 |" in table and targets == []
