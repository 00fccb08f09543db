"""One PEFT + HF Trainer run on a task, set up from one of our configs: the reference side of the PEFT comparison.

    python -m benchmarks.peft_trainer '{"config": "configs/cb/prefix_minilm.yaml", "seed": 1, "epochs": 3}'
    python -m benchmarks.peft_trainer '{"config": ..., "seed": 1, "speed": {"steps": 30, "window": 10,
                                                                         "batches": "ours"}}'

What a PEFT user writes: the backbone from `from_pretrained`, `get_peft_model` with the PEFT config of the method
(PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig; none for full fine-tuning), the tokenizer with
`truncation=True`, `DataCollatorWithPadding` and `Trainer`. Everything else comes from our config so that the two
sides match: data files, max_length, batch size, lr, weight decay, warm-up, schedule, gradient clipping, eval batch,
backbone dropout (off for frozen backbones, on for full fine-tuning) and the head, a dropout + linear classifier on the
mean of the real tokens' last hidden states (`MeanPoolClassifier`; PEFT's SEQ_CLS on BERT would read the pooler).
Accuracy mode evaluates on the eval split after every epoch and reports the best evaluation (batches: the Trainer's
length grouping, `group_by_length`). Speed mode trains `steps` steps without evaluation and reports samples/s over the
steps after the first `window`, on exactly the batches `ipt-ds train` forms (`batches: ours`: our length buckets,
laid out in order and read sequentially) or on the Trainer's default random batches (`batches: default`).
Prints one JSON line with the results.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from torch import nn
from transformers import BertModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertPreTrainedModel


class MeanPoolClassifier(BertPreTrainedModel):
    """BERT + dropout + Linear(H, C) on the mean of the real tokens' states: our `head: {type: linear, pool: mean}`.

    PEFT's input prompts put P virtual positions in front of the tokens (`num_virtual_tokens` = P skips them, as our
    head does); prefix tuning adds P keys and values only, so the states are the T tokens and the mask is P + T."""

    def __init__(self, config, head_dropout: float = 0.1):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(head_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.num_virtual_tokens = 0
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                past_key_values=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        inputs_embeds=inputs_embeds, past_key_values=past_key_values, use_cache=False)
        hidden = out.last_hidden_state[:, self.num_virtual_tokens:].float()  # (B, T, H)
        mask = attention_mask[:, -hidden.shape[1]:].unsqueeze(-1).float()  # (B, T, 1)
        logits = self.classifier(self.dropout((hidden * mask).sum(1) / mask.sum(1)))  # (B, C)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def peft_config(method) -> object | None:
    """The PEFT config of our method config (None: full fine-tuning, no PEFT)."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if method.name == "full":
        return None
    if method.name == "prompt_tuning":  # PEFT samples from the whole vocabulary, we from the 5,000 most frequent
        init = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}[method.init]
        return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=method.num_virtual_tokens,
                                  prompt_tuning_init=init, prompt_tuning_init_text=method.init_text or None)
    if method.name in ("prefix", "ptuning_v2"):  # PEFT's prefix tuning, with or without the MLP projection
        return PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=method.num_virtual_tokens,
                                  prefix_projection=method.projection, encoder_hidden_size=method.projection_hidden)
    if method.name == "ptuning_v1":  # PEFT only prepends; our CB config splits the prompt around the input
        return PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=method.num_virtual_tokens,
                                   encoder_reparameterization_type=method.encoder.upper(),
                                   encoder_hidden_size=method.encoder_hidden or None)
    raise ValueError(f"method '{method.name}' has no PEFT counterpart")


def build_model(cfg, num_labels: int):
    from peft import get_peft_model
    from transformers import AutoConfig, AutoTokenizer

    from ipt_ds.backbone import resolve_model_path

    path, _ = resolve_model_path(cfg.model)
    dropout = {} if cfg.model.dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    hf_config = AutoConfig.from_pretrained(path, num_labels=num_labels, **dropout)
    model = MeanPoolClassifier.from_pretrained(path, config=hf_config, head_dropout=cfg.head.dropout)
    adapter = peft_config(cfg.method)
    if adapter is not None:
        if adapter.peft_type.value != "PREFIX_TUNING":
            model.num_virtual_tokens = adapter.num_virtual_tokens
        model = get_peft_model(model, adapter)
    return model, AutoTokenizer.from_pretrained(path)


def train(cell: dict) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    from ipt_ds.config import load_config
    from ipt_ds.data.pipeline import global_train_batches, load_task_splits
    from ipt_ds.metrics import compute_metrics

    hf_logging.set_verbosity_error()
    speed = cell.get("speed")
    cfg = load_config(Path(cell["config"]), {"run.seed": cell["seed"], "train.epochs": cell.get("epochs", 1)})
    task, train_examples, eval_examples, _ = load_task_splits(cfg.data, cfg.run.seed)
    if any(e.group is not None for e in eval_examples):
        raise ValueError(f"task '{task.name}' has grouped metrics, which this reference does not compute")
    set_seed(cfg.run.seed)
    model, tokenizer = build_model(cfg, len(task.label_names))

    def encode(examples):
        return [{**tokenizer(e.text_a, e.text_b, truncation=True, max_length=cfg.data.max_length), "labels": e.label}
                for e in examples]

    train_set, eval_set = encode(train_examples), encode(eval_examples)
    batch = cfg.train.batch_size
    if speed and speed["batches"] == "ours":  # epoch e is global_train_batches(seed + e), as `ipt-ds train` forms them
        lengths = [len(f["input_ids"]) for f in train_set]
        order = []
        for epoch in range(math.ceil(speed["steps"] * batch / len(train_set)) + 1):
            for indices in global_train_batches(lengths, batch_size=batch, seed=cfg.run.seed + epoch):
                order.extend(indices)
        train_set = [train_set[i] for i in order[: speed["steps"] * batch]]
    if speed:
        total_steps = speed["steps"]
    else:
        total_steps = math.ceil(len(train_set) / batch) * cfg.train.epochs  # the Trainer keeps the short last batch
    args = TrainingArguments(
        output_dir=cell["output_dir"], per_device_train_batch_size=batch,
        per_device_eval_batch_size=cfg.train.eval_batch_size, num_train_epochs=cfg.train.epochs,
        max_steps=total_steps if speed else -1, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        warmup_steps=int(cfg.optim.warmup_ratio * total_steps), lr_scheduler_type=cfg.optim.schedule,
        max_grad_norm=cfg.optim.grad_clip, eval_strategy="no" if speed else "epoch", save_strategy="no",
        logging_strategy="steps" if speed else "epoch", logging_steps=speed["window"] if speed else 500,
        report_to="none", seed=cfg.run.seed, data_seed=cfg.run.seed,
        train_sampling_strategy={"ours": "sequential", "default": "random", None: "group_by_length"}[
            speed and speed["batches"]], remove_unused_columns=False,
        disable_tqdm=True, use_cpu=True)

    def metrics(prediction) -> dict:
        # Labels as the Trainer returns them: group_by_length also reorders the evaluation set.
        return compute_metrics(task.metrics, predictions=prediction.predictions.argmax(-1).tolist(),
                               labels=prediction.label_ids.tolist())

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    pad = DataCollatorWithPadding(tokenizer)
    shapes = []  # (B, T) of every padded batch

    def collate(features: list[dict]) -> dict:
        padded = pad(features)
        shapes.append(padded["input_ids"].shape)
        return padded

    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collate,
                      compute_metrics=metrics, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    train_shapes = list(shapes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {"task": task.name, "method": cfg.method.name, "system": "peft+trainer", "seconds": 0.0,
              "parameters": {"trainable": trainable}}
    if speed:
        window, per_epoch = speed["window"], math.ceil(len(train_set) / batch)
        # Random batches: each epoch of the 250 examples ends with a short batch (250 - 15 * 16 = 10 examples).
        samples = sum(batch if step % per_epoch else len(train_set) - (per_epoch - 1) * batch
                      for step in range(window + 1, total_steps + 1))
        result["samples_per_s"] = samples / (clock.times[-1] - clock.times[window - 1])
        result["padded_tokens_per_sample"] = sum(b * t for b, t in train_shapes) / sum(b for b, _ in train_shapes)
        result["eval_after"] = trainer.evaluate()  # as `ipt-ds train` evaluates once at its last step
    else:
        evals = [entry for entry in trainer.state.log_history if "eval_acc" in entry]
        best = max(evals, key=lambda entry: entry[f"eval_{task.metrics[0]}"])
        result |= {"eval": {name: best[f"eval_{name}"] for name in task.metrics}, "best_epoch": best["epoch"],
                   "evals": [entry[f"eval_{task.metrics[0]}"] for entry in evals],
                   "eval_majority_acc": 100 * max(map([e.label for e in eval_examples].count,
                                                      range(len(task.label_names)))) / len(eval_examples)}
    result["seconds"] = time.perf_counter() - start
    return result


if __name__ == "__main__":
    print(json.dumps(train(json.loads(sys.argv[1]))))
