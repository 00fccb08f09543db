"""Pretraining of IPT's instance prompts (the lookup table and the generator) before fine-tuning.

`ipt-ds pretrain CONFIG.yaml` runs the training loop of `ipt_ds` with one of two objectives (`objectives.py`):
knowledge classification of corpus texts, or transfer across a mixture of source tasks; it writes an artifact that
`method.instance_pretrain` + `method.emb_checkpoints` load in `ipt-ds train`. `ipt-ds build-corpus` writes a labelled
corpus from benchmark datasets. This package uses `ipt_ds`; `ipt_ds` finds these commands through the
`ipt_ds.commands` entry points and never imports this package. docs/pretrain.md has the details.
"""
