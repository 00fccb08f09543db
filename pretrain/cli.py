"""The commands this package adds to `ipt-ds` (entry-point group `ipt_ds.commands` in pyproject.toml); `ipt_ds.cli`
runs them with the same setup and error handling as its own commands.

  ipt-ds pretrain CONFIG.yaml [--section.key=value ...]     pretrain instance prompts (under `deepspeed` for ranks)
  ipt-ds build-corpus --sources=A,B,... --output=NEW.jsonl   a labelled corpus for the knowledge objective
"""

from __future__ import annotations


def pretrain(config: str, **overrides):
    """Pretrain IPT instance prompts (table and generator) with CONFIG (YAML); override any key with
    --section.key=value. Writes RUN/best (the artifact for method.emb_checkpoints), checkpoints and logs."""
    from ipt_ds import preemption

    preemption.install(preemption.DEFAULT_STOP_SIGNALS)  # before the heavy imports: keep a signal sent at start-up
    from ipt_ds.loop import train
    from pretrain.config import load_pretrain_config
    from pretrain.objectives import recipe_for

    cfg = load_pretrain_config(config, overrides)
    train(cfg, recipe_for(cfg))


def build_corpus(**options):
    """Write a labelled jsonl corpus, one category per dataset: --sources=glue/sst2,superglue/rte,...
    --output=NEW.jsonl [--per_category=1000 --seed=13 --root=DIR]."""
    from ipt_ds.confload import ConfigError, build
    from pretrain.corpus import CorpusSpec
    from pretrain.corpus import build_corpus as run

    problems: list[str] = []
    spec = build(CorpusSpec, options, section="build-corpus", problems=problems,
                 where=lambda dotted: f"--{dotted.partition('.')[2]}" if "." in dotted else "ipt-ds build-corpus")
    if problems:
        raise ConfigError(problems)
    run(spec)
