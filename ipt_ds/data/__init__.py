"""Task data: the task registry, readers for the benchmark layouts and user files, few-shot sampling, batching."""

from ipt_ds.data.readers import FORMATS, default_data_root, load_hub_split, read_split, resolve_split
from ipt_ds.data.sampling import bucket_batches, sample_per_class
from ipt_ds.data.tasks import TASKS, Example, Task, get_task

__all__ = [
    "FORMATS",
    "TASKS",
    "Example",
    "Task",
    "bucket_batches",
    "default_data_root",
    "get_task",
    "load_hub_split",
    "read_split",
    "resolve_split",
    "sample_per_class",
]
