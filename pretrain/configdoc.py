"""The reference of pretraining's own config sections and of build-corpus's options, as in docs/pretrain.md:
`python -m pretrain.configdoc` (a test checks that docs/pretrain.md holds the current text)."""

from ipt_ds.confload import reference_markdown
from pretrain.config import CorpusConfig, ObjectiveConfig, SourcesConfig
from pretrain.corpus import CorpusSpec


def render() -> str:
    sections = {"objective": ObjectiveConfig, "corpus": CorpusConfig, "sources": SourcesConfig}
    return reference_markdown(sections) + "\n" + reference_markdown({"ipt-ds build-corpus": CorpusSpec})


if __name__ == "__main__":
    print(render(), end="")
