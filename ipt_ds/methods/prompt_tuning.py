"""Prompt tuning (Lester, Al-Rfou and Constant, 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

P trainable vectors in the backbone's embedding space are prepended to every input's word embeddings; the backbone
stays frozen. The vectors start random, from the embeddings of random frequent vocabulary tokens (Lester's best
setting), or from the embeddings of a text such as a task description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ipt_ds.backbone import Backbone, embedding_rows
from ipt_ds.confload import at_least
from ipt_ds.methods.base import MethodConfig, MethodModule, MethodOutput, run_with_input_prompt
from ipt_ds.methods.registry import register

# Lester et al. sample initial tokens among the 5,000 most frequent; BPE/WordPiece vocabularies are roughly
# frequency-ordered after their special tokens.
NUM_FREQUENT_TOKENS = 5000


@dataclass(kw_only=True)
class PromptTuningConfig(MethodConfig):
    name: str = "prompt_tuning"
    num_virtual_tokens: int = 20
    """Prompt length P."""
    init: Literal["random", "vocab", "text"] = "vocab"
    """random: U(-init_range, init_range); vocab: embeddings of random frequent tokens; text: of `init_text`."""
    init_text: str = ""
    """Text whose token embeddings initialise the prompt (repeated or cut to P tokens) when init is 'text'."""
    init_range: float = 0.5

    def validate(self) -> list[str]:
        problems = at_least(self, "method", 1, "num_virtual_tokens") + at_least(self, "method", 0, "init_range")
        if self.init == "text" and not self.init_text:
            problems.append("method.init is 'text' but method.init_text is empty; give the text or use init: vocab")
        return problems


class PromptTuning(MethodModule):
    def __init__(self, prompt: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(prompt)  # (P, H)
        self.num_prefix_positions = self.num_embedded_prompts = prompt.shape[0]

    def peft_adapter(self) -> tuple[dict, torch.Tensor]:
        return {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM"}, self.prompt

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        batch_size = batch["input_ids"].shape[0]
        return run_with_input_prompt(backbone, self.prompt.expand(batch_size, -1, -1), batch)


def initial_prompt(backbone: Backbone, tokenizer, *, num_tokens: int, init: str, init_text: str = "",
                   init_range: float = 0.5) -> torch.Tensor:
    """(num_tokens, H) starting prompt: U(-init_range, init_range), random frequent tokens' embeddings, or a text's."""
    hidden = backbone.hidden_size
    if init == "random":
        return torch.empty(num_tokens, hidden).uniform_(-init_range, init_range)
    if init == "vocab":
        special = set(tokenizer.all_special_ids)
        frequent = range(min(NUM_FREQUENT_TOKENS + len(special), backbone.vocab_size))
        candidates = [i for i in frequent if i not in special]
        ids = torch.tensor(candidates)[torch.randperm(len(candidates))[:num_tokens]]
    else:
        text_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor((text_ids * num_tokens)[:num_tokens])
    return embedding_rows(backbone, ids)


@register("prompt_tuning", PromptTuningConfig)
def build(cfg: PromptTuningConfig, backbone: Backbone, tokenizer) -> nn.Module:
    return PromptTuning(initial_prompt(backbone, tokenizer, num_tokens=cfg.num_virtual_tokens, init=cfg.init,
                                       init_text=cfg.init_text, init_range=cfg.init_range))
