"""One PEFT + HF Trainer run on a task, set up from one of our configs: the reference side of the PEFT comparison.

    python -m benchmarks.peft_trainer '{"config": "configs/cb/prefix_minilm.yaml", "seed": 1, "epochs": 3}'
    python -m benchmarks.peft_trainer '{"config": ..., "seed": 1, "speed": {"steps": 30, "window": 10,
                                                                         "batches": "ours"}}'
    python -m benchmarks.peft_trainer '{"config": "configs/sst2/prompt_tuning_smollm2.yaml", "seed": 1,
                                        "data_seed": 13}'

What a PEFT user writes: the backbone from `from_pretrained`, `get_peft_model` with the PEFT config of the method
(PromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig; none for full fine-tuning), the tokenizer with
`truncation=True`, `DataCollatorWithPadding` and `Trainer`. Everything else comes from our config so that the two
sides match: data files, max_length, batch size, lr, weight decay, warm-up, schedule, gradient clipping, eval batch,
backbone dropout (off for frozen backbones, on for full fine-tuning) and the head, a dropout + linear classifier on the
mean of the real tokens' last hidden states (`MeanPoolClassifier`; PEFT's SEQ_CLS on BERT would read the pooler).
A verbalizer head on a LLaMA-class decoder (SmolLM2) is `VerbalizerClassifier`: the checkpoint's own LM head read at
the last real token, keeping the label words' logits; its inputs are the template filled in and cut at `{mask}`,
encoded by our `TextEncoder` (same token ids, truncation and label-word ids as our side), and its loss is our
`head.full_vocab_loss` choice. The epochs are the config's unless the cell gives `epochs`; `data_seed` sets
`data.lmbff_seed` (which LM-BFF k-shot sample trains).
Accuracy mode evaluates on the eval split after every epoch and reports the best evaluation (batches: the Trainer's
length grouping, `group_by_length`); with a test split (LM-BFF: dev selects, test reports) it keeps the trainable
tensors of the best-evaluated epoch (the first of equal ones) and scores the test split once with them at the end.
Speed mode trains `steps` steps without evaluation and reports samples/s over the steps after the first `window`, on
exactly the batches `ipt-ds train` forms (`batches: ours`: our length buckets, laid out in order and read
sequentially) or on the Trainer's default random batches (`batches: default`).
Prints one JSON line with the results.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel, LlamaModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertPreTrainedModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel


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


class VerbalizerClassifier(LlamaPreTrainedModel):
    """LLaMA-class decoder + its pretrained LM head at the last real token, label words' logits as the class scores:
    our `head: {type: verbalizer}` on a decoder (the label word is the template's continuation).

    `model` and `lm_head` are named as in LlamaForCausalLM, so the checkpoint loads by name (and the LM head is tied to
    the embeddings where the checkpoint says so). Right-padded inputs; PEFT's prompt tuning and P-tuning put P virtual
    positions in front of the T tokens and prefix tuning only adds P keys and values, but in both cases the mask PEFT
    passes is P + T long with the virtual part all ones, so the last S columns of the mask describe the S positions
    of the hidden states either way."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config, label_token_ids: list[int] = (), full_vocab_loss: bool = True):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # A plain list, not a buffer: from_pretrained builds the model on the meta device and loads only weights.
        self.label_token_ids = list(label_token_ids)
        self.full_vocab_loss = full_vocab_loss
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        # `past_key_values` is the name PEFT's prefix tuning looks for in this signature; LlamaModel calls it `cache`.
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         cache=past_key_values, use_cache=False)
        hidden = out.last_hidden_state  # (B, S, H)
        last = attention_mask[:, -hidden.shape[1]:].sum(1).long() - 1  # (B,) the last real token among the S
        vocab_logits = self.lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).float()  # (B, V)
        logits = vocab_logits[:, self.label_token_ids]  # (B, C)
        loss = None
        if labels is not None and self.full_vocab_loss:  # the gold label word among the whole vocabulary
            loss = nn.functional.cross_entropy(vocab_logits, torch.tensor(self.label_token_ids)[labels.cpu()].to(
                labels.device))
        elif labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


PROMPT_METHODS = ("prompt_tuning", "prefix", "ptuning_v2", "ptuning_v1")  # our methods that PEFT has


def has_counterpart(cfg) -> bool:
    """Whether this reference runs the config: a PEFT prompt method, or full fine-tuning with a linear head."""
    return cfg.method.name in PROMPT_METHODS or (cfg.method.name == "full" and cfg.head.type == "linear")


def peft_config(method, tokenizer_source: dict | None = None) -> object | None:
    """The PEFT config of our method config (None: full fine-tuning, no PEFT). `tokenizer_source`: PromptTuningConfig's
    `tokenizer_name_or_path` and `tokenizer_kwargs`, which its TEXT init reads the init text with."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if method.name == "full":
        return None
    if method.name == "prompt_tuning":  # PEFT samples from the whole vocabulary, we from the 5,000 most frequent
        init = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}[method.init]
        text = {**(tokenizer_source or {})} if init == "TEXT" else {}
        return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=method.num_virtual_tokens,
                                  prompt_tuning_init=init, prompt_tuning_init_text=method.init_text or None, **text)
    if method.name in ("prefix", "ptuning_v2"):  # PEFT's prefix tuning, with or without the MLP projection
        return PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=method.num_virtual_tokens,
                                  prefix_projection=method.projection, encoder_hidden_size=method.projection_hidden)
    if method.name == "ptuning_v1":  # PEFT only prepends; our CB config splits the prompt around the input
        return PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=method.num_virtual_tokens,
                                   encoder_reparameterization_type=method.encoder.upper(),
                                   encoder_hidden_size=method.encoder_hidden or None)
    raise ValueError(f"method '{method.name}' has no PEFT counterpart")


def build_model(cfg, num_labels: int):
    """(PEFT model, tokenizer) of the config: BERT + `MeanPoolClassifier` for a linear head, a LLaMA-class decoder +
    `VerbalizerClassifier` for a verbalizer head."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoTokenizer

    from ipt_ds.backbone import resolve_model_path

    if cfg.head.type == "verbalizer":
        return build_verbalizer_model(cfg, num_labels)
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


def build_verbalizer_model(cfg, num_labels: int):
    """`from_pretrained` of the decoder (a GGUF file as transformers reads it) under `VerbalizerClassifier`, with our
    label-word ids, under the method's PEFT config."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoTokenizer

    from ipt_ds.backbone import resolve_model_path
    from ipt_ds.data.encode import label_token_ids

    if cfg.method.name not in PROMPT_METHODS:
        raise ValueError(f"method '{cfg.method.name}' has no PEFT counterpart with a verbalizer head")
    path, gguf_file = resolve_model_path(cfg.model)
    source = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as our loader does; padding is masked
    tokenizer.padding_side = "right"  # VerbalizerClassifier reads the last real token from the mask
    words = cfg.head.label_words
    if len(words) != num_labels or not cfg.head.template:
        raise ValueError(f"head.label_words (one word for each of the {num_labels} labels) and head.template must be "
                         "given in the config for this reference's verbalizer head")
    hf_config = AutoConfig.from_pretrained(path, **source)
    if hf_config.model_type != "llama":
        raise ValueError(f"model '{cfg.model.name_or_path}' is a {hf_config.model_type}; this reference's verbalizer "
                         "head runs LLaMA-class decoders")
    model = VerbalizerClassifier.from_pretrained(path, config=hf_config, dtype=torch.float32,
                                                 label_token_ids=label_token_ids(tokenizer, words),
                                                 full_vocab_loss=cfg.head.full_vocab_loss, **source)
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers reads a GGUF file by dequantizing it into plain float tensors but leaves its quantizer
        # attached, and the Trainer refuses to train a model marked quantized; the weights are plain, so drop it.
        model.hf_quantizer.remove_quantization_config(model)
    adapter = peft_config(cfg.method, {"tokenizer_name_or_path": path, "tokenizer_kwargs": source})
    return get_peft_model(model, adapter), tokenizer


def train(cell: dict) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    from ipt_ds.config import load_config
    from ipt_ds.data.pipeline import global_train_batches, load_task_splits
    from ipt_ds.metrics import compute_metrics

    hf_logging.set_verbosity_error()
    speed = cell.get("speed")
    overrides = {**cell.get("overrides", {}), "run.seed": cell["seed"]}
    overrides |= {"train.epochs": cell["epochs"]} if "epochs" in cell else {}
    overrides |= {"data.lmbff_seed": cell["data_seed"]} if cell.get("data_seed") else {}
    cfg = load_config(Path(cell["config"]), overrides)
    task, train_examples, eval_examples, test_examples = load_task_splits(cfg.data, cfg.run.seed)
    if any(e.group is not None for e in eval_examples):
        raise ValueError(f"task '{task.name}' has grouped metrics, which this reference does not compute")
    set_seed(cfg.run.seed)
    model, tokenizer = build_model(cfg, len(task.label_names))

    if cfg.head.type == "verbalizer":  # the template filled in and cut at {mask}, exactly as our side encodes it
        from ipt_ds.data.encode import TextEncoder

        verbalize = TextEncoder(tokenizer=tokenizer, task=task, max_length=cfg.data.max_length,
                                template=cfg.head.template, decoder=True)

        def encode(examples):
            return [{"input_ids": verbalize(e)["input_ids"], "labels": e.label} for e in examples]
    else:
        def encode(examples):
            return [{**tokenizer(e.text_a, e.text_b, truncation=True, max_length=cfg.data.max_length),
                     "labels": e.label} for e in examples]

    train_set, eval_set, test_set = encode(train_examples), encode(eval_examples), encode(test_examples)
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
            self.begin, self.times = 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    class BestEpoch(TrainerCallback):
        """Keeps a copy of the trainable tensors at the best evaluation so far (the first of equal ones)."""

        def __init__(self):
            self.score, self.tensors = -math.inf, {}

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics[f"eval_{task.metrics[0]}"] > self.score:
                self.score = metrics[f"eval_{task.metrics[0]}"]
                self.tensors = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    pad = DataCollatorWithPadding(tokenizer)
    shapes = []  # (B, T) of every padded batch

    def collate(features: list[dict]) -> dict:
        padded = pad(features)
        shapes.append(padded["input_ids"].shape)
        return padded

    clock, best_epoch = StepClock(), BestEpoch()
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, data_collator=collate,
                      compute_metrics=metrics, callbacks=[clock, best_epoch])
    start = time.perf_counter()
    trainer.train()
    train_shapes = list(shapes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {"task": task.name, "method": cfg.method.name, "system": "peft+trainer", "seconds": 0.0,
              "parameters": {"trainable": trainable}}
    if speed:
        window, per_epoch = speed["window"], math.ceil(len(train_set) / batch)
        # Random batches: each epoch of the 250 examples ends with a short batch (250 - 15 * 16 = 10 examples).
        def samples(steps: range) -> int:
            return sum(batch if step % per_epoch else len(train_set) - (per_epoch - 1) * batch for step in steps)

        timed = clock.times[-1] - clock.times[window - 1]
        result["samples_per_s"] = samples(range(window + 1, total_steps + 1)) / timed
        ends = [clock.begin, *clock.times[window - 1 :: window]]  # each window from the start of training
        result["windows"] = [{"samples": samples(range(w * window + 1, (w + 1) * window + 1)),
                              "seconds": ends[w + 1] - ends[w]} for w in range(len(ends) - 1)]
        result["padded_tokens_per_sample"] = sum(b * t for b, t in train_shapes) / sum(b for b, _ in train_shapes)
        result["eval_after"] = trainer.evaluate()  # as `ipt-ds train` evaluates once at its last step
    else:
        evals = [entry for entry in trainer.state.log_history if "eval_acc" in entry]
        best = max(evals, key=lambda entry: entry[f"eval_{task.metrics[0]}"])
        result |= {"eval": {name: best[f"eval_{name}"] for name in task.metrics}, "best_epoch": best["epoch"],
                   "evals": [entry[f"eval_{task.metrics[0]}"] for entry in evals],
                   "eval_majority_acc": majority_acc(eval_examples, len(task.label_names))}
        # LM-BFF: the dev split selected the epoch, the (labelled) test split is reported with its parameters.
        if test_set and all(e.label is not None for e in test_examples):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in best_epoch.tensors:
                        p.copy_(best_epoch.tensors[name])
            # The restored tensors must score the dev split as the best epoch did (the same batches, no dropout).
            rescored = trainer.evaluate()[f"eval_{task.metrics[0]}"]
            assert rescored == best[f"eval_{task.metrics[0]}"], (rescored, best)
            scores = trainer.predict(test_set, metric_key_prefix="test").metrics
            result |= {"test": {name: scores[f"test_{name}"] for name in task.metrics},
                       "test_majority_acc": majority_acc(test_examples, len(task.label_names))}
    result["seconds"] = time.perf_counter() - start
    return result


def majority_acc(examples, num_labels: int) -> float:
    """Accuracy of the most frequent label given to every example."""
    return 100 * max(map([e.label for e in examples].count, range(num_labels))) / len(examples)


if __name__ == "__main__":
    print(json.dumps(train(json.loads(sys.argv[1]))))
