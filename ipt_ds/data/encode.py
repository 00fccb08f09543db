"""Examples -> token ids for a given head, and batches of them -> padded tensors.

Linear heads read the tokenizer's own single/pair encoding. Verbalizer heads read a template such as
"{a} ? {mask} , {b}": the texts are truncated (longest first) so that the mask always survives, and the position the
head reads is recorded: the mask token for encoders, the last token before `{mask}` for decoders (whose template must
end with `{mask}`: the label word is the continuation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ipt_ds.data.tasks import Example, Task

PLACEHOLDER = re.compile(r"(\{a\}|\{b\}|\{mask\})")


def label_token_ids(tokenizer, words: list[str] | tuple[str, ...]) -> list[int]:
    """One vocabulary id per label word (encoded as a word after a space); clear error if that is not possible."""
    ids = []
    for word in words:
        pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            tokens = tokenizer.convert_ids_to_tokens(pieces)
            raise ValueError(
                f"head.label_words: '{word}' is {len(pieces)} tokens {tokens} for this tokenizer; "
                "a verbalizer needs single-token label words, choose another word"
            )
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"head.label_words {list(words)} map to repeated token ids {ids}; use distinct words")
    return ids


@dataclass
class TextEncoder:
    tokenizer: object
    task: Task
    max_length: int
    template: str = ""
    """Empty: the linear-head encoding; else a verbalizer template."""
    decoder: bool = False
    siamese: bool = False
    """Encode text_a and text_b as two sequences (input_ids, pair_input_ids) for a siamese head."""
    num_truncated: int = 0

    def __post_init__(self):
        full = self.tokenizer("x")["input_ids"]
        (content,) = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        cut = full.index(content)
        self._prefix, self._suffix = full[:cut], full[cut + 1 :]  # special tokens around one sequence
        if self.template:
            if self.decoder and not self.template.rstrip().endswith("{mask}"):
                raise ValueError(f"head.template '{self.template}' must end with {{mask}} for a decoder backbone")
            if not self.decoder and self.tokenizer.mask_token_id is None:
                raise ValueError("head.type 'verbalizer' needs a tokenizer with a mask token on an encoder backbone")

    def __call__(self, example: Example) -> dict:
        features = self._verbalizer(example) if self.template else self._pair(example)
        if example.label is not None:
            features["labels"] = example.label
        return features

    def _pair(self, example: Example) -> dict:
        if not self.siamese:
            return self._tokenize(example.text_a, example.text_b)
        if example.text_b is None:
            raise ValueError(f"head.siamese needs sentence pairs; task '{self.task.name}' has single texts")
        first, second = self._tokenize(example.text_a), self._tokenize(example.text_b)
        return {"input_ids": first["input_ids"], "split_position": first["split_position"],
                "pair_input_ids": second["input_ids"], "pair_split_position": second["split_position"]}

    def _tokenize(self, text_a: str, text_b: str | None = None) -> dict:
        enc = self.tokenizer(text_a, text_b)
        if len(enc["input_ids"]) > self.max_length:
            self.num_truncated += 1
            enc = self.tokenizer(text_a, text_b, truncation="longest_first", max_length=self.max_length)
        # Where a method may split its prompt around the input: the start of text_b, else the end of text_a.
        sequence_ids = enc.sequence_ids(0)
        split = next((i for i, s in enumerate(sequence_ids) if s == 1), None)
        if split is None:
            split = max(i for i, s in enumerate(sequence_ids) if s == 0) + 1 if 0 in sequence_ids else 0
        features = {"input_ids": enc["input_ids"], "split_position": split}
        if "token_type_ids" in enc:
            features["token_type_ids"] = enc["token_type_ids"]
        return features

    def _verbalizer(self, example: Example) -> dict:
        texts = {"{a}": example.text_a, "{b}": example.text_b or ""}
        segments = []  # (kind, ids)
        for piece in (p.strip() for p in PLACEHOLDER.split(self.template)):
            if not piece:
                continue
            text = texts.get(piece, piece)
            ids = (
                []
                if piece == "{mask}"
                else self.tokenizer(text if not segments else " " + text, add_special_tokens=False)["input_ids"]
            )
            segments.append((piece, ids))
        budget = self.max_length - len(self._prefix) - len(self._suffix) - (0 if self.decoder else 1)
        budget -= sum(len(ids) for kind, ids in segments if kind not in texts)
        lengths = {kind: len(ids) for kind, ids in segments if kind in texts}
        if sum(lengths.values()) > budget:
            self.num_truncated += 1
            while sum(lengths.values()) > max(budget, 0):
                longest = max(lengths, key=lengths.get)
                lengths[longest] -= 1
        input_ids = list(self._prefix)
        label_position = split = -1
        for kind, ids in segments:
            if kind == "{b}" or (kind == "{mask}" and split < 0):
                split = len(input_ids)  # a split prompt goes before text_b, else before the mask
            if kind == "{mask}":
                if self.decoder:
                    label_position = len(input_ids) - 1
                    break  # the label word is what follows; nothing after {mask} is fed
                label_position = len(input_ids)
                input_ids.append(self.tokenizer.mask_token_id)
            else:
                input_ids.extend(ids[: lengths.get(kind, len(ids))])
        if not self.decoder:
            input_ids.extend(self._suffix)
        return {"input_ids": input_ids, "label_position": label_position, "split_position": split}


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples to the longest one."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.full((len(features), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(features), length, dtype=torch.long),
    }
    per_token = [key for key in ("token_type_ids", "source_mask") if key in features[0]]
    for key in per_token:
        batch[key] = torch.zeros(len(features), length, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(f["input_ids"])
        batch["attention_mask"][row, :n] = 1
        for key in per_token:
            batch[key][row, :n] = torch.tensor(f[key])
    if "pair_input_ids" in features[0]:
        pair = collate([{"input_ids": f["pair_input_ids"], "split_position": f["pair_split_position"]}
                        for f in features], pad_id)
        batch.update({f"pair_{key}": value for key, value in pair.items()})
    if "decoder_input_ids" in features[0]:  # encoder-decoder generation: the decoder side, right-padded
        decoder = collate([{"input_ids": f["decoder_input_ids"]} for f in features], pad_id)
        batch["decoder_input_ids"], batch["decoder_attention_mask"] = decoder["input_ids"], decoder["attention_mask"]
        batch["target_ids"] = collate([{"input_ids": f["target_ids"]} for f in features], pad_id)["input_ids"]
    if "frozen_states" in features[0]:  # (T_i, H) each, from the frozen-state cache; zeros where the input is padded
        states = features[0]["frozen_states"]
        batch["frozen_states"] = states.new_zeros(len(features), length, states.shape[-1])  # (B, T, H)
        for row, f in enumerate(features):
            batch["frozen_states"][row, : len(f["input_ids"])] = f["frozen_states"]
    for key in ("label_position", "split_position"):
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features])
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], float) else torch.long)
    return batch
