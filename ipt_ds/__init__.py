"""ipt-ds: instance-wise, late and classic prompt tuning of frozen language models on DeepSpeed."""

__version__ = "0.1.0"
