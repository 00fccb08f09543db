"""Instance prompt generators: (B, N, D_in) token vectors of one input -> (B, N, D_out) prompt vectors.

Shared by the instance-wise methods. Unlike the IPT reference (one TextCNN channel per kernel and a 3-number
bottleneck, an LSTM fed time-major tensors, MLP dropout that stays on at evaluation), every generator keeps a
configurable width, reads the whole instance and produces one vector per prompt position:
- `cnn`: Conv1d with kernel sizes 3, 4 and 5 (`width` channels each, same padding) -> ReLU -> Linear(3 * width, D_out)
  at each position;
- `mlp`: each position's vector next to the instance mean -> Linear(2 * D_in, width) -> ReLU -> dropout ->
  Linear(width, D_out);
- `lstm`: a batch-first bidirectional LSTM (hidden `width` per direction) -> Linear(2 * width, D_out).
"""

from __future__ import annotations

import torch
from torch import nn

KERNEL_SIZES = (3, 4, 5)


class TextCNN(nn.Module):
    def __init__(self, d_in: int, d_out: int, width: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(d_in, width, k, padding="same") for k in KERNEL_SIZES)
        self.out = nn.Linear(len(KERNEL_SIZES) * width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, D_in, N)
        features = torch.cat([torch.relu(conv(x)) for conv in self.convs], dim=1)  # (B, 3 * width, N)
        return self.out(features.transpose(1, 2))  # (B, N, D_out)


class MLPGenerator(nn.Module):
    def __init__(self, d_in: int, d_out: int, width: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * d_in, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(dim=1, keepdim=True).expand_as(x)  # (B, N, D_in): what the whole instance says
        return self.net(torch.cat([x, context], dim=-1))


class LSTMGenerator(nn.Module):
    def __init__(self, d_in: int, d_out: int, width: int):
        super().__init__()
        self.lstm = nn.LSTM(d_in, width, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(x)[0])  # (B, N, 2 * width) -> (B, N, D_out)


GENERATORS = {"cnn": TextCNN, "mlp": MLPGenerator, "lstm": LSTMGenerator}


def build_generator(kind: str, d_in: int, d_out: int, width: int) -> nn.Module:
    return GENERATORS[kind](d_in, d_out, width)
