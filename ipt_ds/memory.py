"""Per-rank memory of a training job before it runs, counting frozen parameters as frozen (`ipt-ds estimate-memory`).

DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs_all_live` and the ZeRO-3 one) assume that every
parameter trains, at 16 to 18 bytes each; with a frozen backbone most parameters are weights and nothing more. Per rank:

- weights in the engine's dtype; divided by the world size under ZeRO-3, except those at or below
  `stage3_param_persistence_threshold`, which every rank keeps whole;
- trainable parameters only: an fp32 master copy (DeepSpeed clones one under ZeRO-1/2/3 even in fp32), fp32 gradients
  and Adam's two moments, partitioned as ZeRO does it (on the host with `offload_optimizer`), and the reduce bucket;
- ZeRO-3 gathered parameters: from the second step on, DeepSpeed keeps a parameter gathered from its forward use to its
  backward use when that reuse is nearer than `stage3_max_reuse_distance` elements, and always while prefetching is on
  (`stage3_prefetch_bucket_size` > 0: the prefetcher marks the parameters it sees in use for a later step), so the
  modules backward runs through stay gathered; with both at 0 (ds_configs/zero3.json) only the module running is;
- activations autograd keeps, per layer from what each op saves (`saved_per_token`), for the layers at and above the
  first trainable part: none for a linear probe, L - k for a prompt entering at layer k, all L for one at the input;
- working memory: one layer's gradients plus forward temporaries (on a GPU one layer's; on a CPU every layer's, since
  glibc keeps the blocks freed below live tensors, and under ZeRO-3 the first step's per-module gathers likewise);
  the evaluation forward (`train.eval_batch_size`, no autograd); the optimizer step's temporaries;
- a fixed process overhead;
- with ZeRO-Infinity's NVMe parameter offload, the partitions live in files: only the persistent parameters and the
  pinned swap buffers (`buffer_count x buffer_size`) stay in memory.
Not counted: transients while loading and flattening at start, deep prompts' key/value prefixes, the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MIB = 2**20
PROCESS_OVERHEAD_BYTES = 500 * MIB
"""Peak RSS of one rank of a 2-rank CPU run of a 2-layer, 32-wide BERT (1M parameters, nearly all its vocabulary):
python, torch, transformers, DeepSpeed, the tokenizer, gloo and DeepSpeed's shared-memory comm buffers (262 MiB after
the imports alone). `python -m benchmarks.memory` measures it again (its `tiny` rows)."""

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) for what the JSON leaves out.
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                 "stage3_param_persistence_threshold": 100_000, "stage3_max_reuse_distance": 1_000_000_000,
                 "memory_efficient_linear": True}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the estimate needs from a built model: parameter counts and transformer sizes, no tensors."""

    units: tuple[tuple[tuple[tuple[int, bool], ...], bool], ...]
    """Per module that owns parameters: ((elements, trains) per parameter, whether backward runs through it). A module
    is what ZeRO-3 gathers at once."""
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers_with_grad: int
    """Layers whose activations autograd keeps (0 to L)."""
    gated_mlp: bool
    """LLaMA-style act(gate) * up MLP, which keeps three intermediate tensors instead of one."""
    linear_inputs_kept: bool
    """A backbone linear weight trains, so every linear layer keeps its input for the weight gradient."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    gradient_checkpointing: bool = False

    @property
    def frozen(self) -> int:
        return sum(n for params, _ in self.units for n, trains in params if not trains)

    @property
    def trainable(self) -> int:
        return sum(n for params, _ in self.units for n, trains in params if trains)


@dataclass(frozen=True, kw_only=True)
class Job:
    """How the job runs: ranks, batch, sequence, and the DeepSpeed settings that size memory."""

    world_size: int
    micro_batch_size: int
    eval_batch_size: int
    seq_len: int
    """Positions per sequence, prompt positions included."""
    sequences_per_example: int = 1
    """2 for siamese heads, which encode the two texts of a pair apart."""
    stage: int
    dtype_bytes: int
    offload_optimizer: bool = False
    offload_param: bool = False
    offload_param_nvme: bool = False
    """ZeRO-Infinity: partitioned parameters live in files on NVMe (disk), read back into pinned host buffers."""
    nvme_swap_buffer_elements: int = 0
    """offload_param's buffer_count x buffer_size: the host buffers NVMe partitions are read into."""
    reduce_bucket_size: int = ZERO_DEFAULTS["reduce_bucket_size"]
    overlap_comm: bool = False
    prefetch_bucket_size: int = ZERO_DEFAULTS["stage3_prefetch_bucket_size"]
    persistence_threshold: int = ZERO_DEFAULTS["stage3_param_persistence_threshold"]
    max_reuse_distance: int = ZERO_DEFAULTS["stage3_max_reuse_distance"]
    memory_efficient_linear: bool = True
    """ZeRO-3 replaces F.linear by a function that keeps every linear input, frozen weight or not."""
    accelerator: Literal["cpu", "cuda"] = "cpu"

    def __post_init__(self):
        problems = [f"{name} must be >= 1, got {value}" for name, value in
                    (("world_size", self.world_size), ("batch_size", self.micro_batch_size),
                     ("eval_batch_size", self.eval_batch_size), ("seq_len", self.seq_len)) if value < 1]
        if self.stage not in (0, 1, 2, 3):
            problems.append(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_param and self.stage != 3:
            problems.append("parameter offload needs ZeRO stage 3")
        if self.offload_param_nvme and not self.offload_param:
            problems.append("NVMe parameter offload needs offload_param")
        if self.accelerator not in ("cpu", "cuda"):
            problems.append(f"accelerator must be cpu or cuda, got {self.accelerator!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Part:
    name: str
    bytes: float
    where: Literal["accelerator", "host", "nvme"]
    how: str


def saved_per_token(shape: ModelShape, job: Job) -> float:
    """Bytes one layer keeps for backward per position (B = T = 1), from what each op saves (measured with
    torch.autograd.graph.saved_tensors_hooks on BERT and LLaMA layers; tests/test_memory.py checks it)."""
    hidden, inter, heads, seq = shape.hidden_size, shape.intermediate_size, shape.num_heads, job.seq_len
    # Frozen weights: both norms' inputs (2H); q, k, v and the attention output (4H); the MLP activation's input(s);
    # the (S,) row of the materialized attention mask. In fp32: log-sum-exp per head and the norms' statistics.
    elements = 6 * hidden + (3 if shape.gated_mlp else 1) * inter + seq
    fp32 = heads + 4
    if shape.linear_inputs_kept or (job.stage == 3 and job.memory_efficient_linear):
        elements += 2 * hidden + inter  # inputs of the q/k/v and MLP projections, and the MLP output projection
    if shape.hidden_dropout > 0:
        elements += 2 * hidden  # the noise of the two residual dropouts
    if shape.attention_dropout > 0:  # dropout on the probabilities: attention runs unfused and keeps (S, S) per head
        elements += 3 * heads * seq
        fp32 -= heads
    return elements * job.dtype_bytes + fp32 * 4


def temporaries_per_token(shape: ModelShape, job: Job) -> float:
    """Bytes one layer's forward allocates and frees again per position: projection outputs and norm outputs."""
    kept = shape.linear_inputs_kept or (job.stage == 3 and job.memory_efficient_linear)
    return (3 * shape.hidden_size if kept else 4 * shape.hidden_size + shape.intermediate_size) * job.dtype_bytes


def gathered_elements(shape: ModelShape, job: Job, *, evaluation: bool) -> int:
    """ZeRO-3: elements of partitioned parameters held whole at the peak (end of the forward)."""
    sizes = [(sum(n for n, _ in params if n > job.persistence_threshold), in_backward)
             for params, in_backward in shape.units]
    largest = max((n for n, _ in sizes), default=0)
    prefetch = min(job.prefetch_bucket_size, sum(n for n, _ in sizes))
    kept = sum(n for n, in_backward in sizes if in_backward or evaluation)  # evaluation has no backward to release them
    if not prefetch:
        kept = min(kept, job.max_reuse_distance // 2)
    return max(kept, largest + prefetch)


def estimate(shape: ModelShape, job: Job) -> list[Part]:
    """Per-rank memory by part; bytes are per rank, `where` says on which device they live."""
    ranks, width, stage = job.world_size, job.dtype_bytes, job.stage
    trainable = shape.trainable
    params = [n_trains for unit, _ in shape.units for n_trains in unit]
    persistent = {trains: sum(n for n, t in params if t == trains and n <= job.persistence_threshold)
                  for trains in (False, True)} if stage == 3 else {False: 0, True: 0}

    def weights(trains: bool) -> float:
        total = sum(n for n, t in params if t == trains)
        return ((total - persistent[trains]) / ranks if stage == 3 else total) + persistent[trains]

    sharded = "/ ranks (ZeRO-3)" if stage == 3 else "whole on every rank"
    weight_where = "host" if job.offload_param else "accelerator"
    if job.offload_param_nvme:  # the partitions are files; only the persistent (small, whole) parameters stay
        sharded += ", partitions on NVMe"
        swapped = {trains: (weights(trains) - persistent[trains]) * width for trains in (False, True)}
    state_where = "host" if job.offload_optimizer else "accelerator"
    state_ranks = ranks if stage >= 1 else 1
    parts = [
        Part("frozen weights", weights(False) * width, weight_where, f"{shape.frozen:,} x {width} B {sharded}"),
        Part("trainable weights", weights(True) * width, weight_where, f"{trainable:,} x {width} B {sharded}"),
        Part("fp32 master weights", 0 if stage == 0 and width == 4 else trainable * 4 / state_ranks, state_where,
             "trainable x 4 B" + (" / ranks" if stage >= 1 else "")),
        Part("gradients", trainable * (4 / ranks if stage >= 2 else width), state_where,
             "trainable x 4 B / ranks (ZeRO-2/3)" if stage >= 2 else f"trainable x {width} B"),
        Part("Adam moments", trainable * 8 / state_ranks, state_where,
             "trainable x 8 B" + (" / ranks" if stage >= 1 else "")),
    ]
    if job.offload_param_nvme:
        parts[0:2] = [Part(part.name, part.bytes - swapped[trains], part.where, part.how + " (persistent ones)")
                      for part, trains in zip(parts[0:2], (False, True), strict=True)]
        parts[2:2] = [Part("weights on NVMe", swapped[False] + swapped[True], "nvme", "partitions, not in memory"),
                      Part("NVMe swap buffers", job.nvme_swap_buffer_elements * width, "host",
                           f"offload_param buffer_count x buffer_size = {job.nvme_swap_buffer_elements:,} elements")]
    if stage >= 2:
        # A CPU process touches only the part of the bucket that gradients are copied into; a GPU allocates it whole.
        buffers = 2 if job.overlap_comm else 1
        used = (min(job.reduce_bucket_size * buffers, trainable) if job.accelerator == "cpu" or not trainable
                else job.reduce_bucket_size * buffers)
        parts.append(Part("gradient reduce bucket", used * width, "accelerator",
                          f"reduce_bucket_size {job.reduce_bucket_size:,} x {buffers}"))
    gathered = gathered_elements(shape, job, evaluation=False) if stage == 3 else 0
    if stage == 3:
        parts.append(Part("gathered parameters (ZeRO-3)", gathered * width, "accelerator",
                          f"{gathered:,} elements held whole at the end of the forward"))
    if stage == 3 and job.accelerator == "cpu":
        # The first step gathers and frees each module between the activations it saves; glibc keeps those blocks.
        parts.append(Part("first step's freed gathers (ZeRO-3, CPU)", gathered * width, "accelerator",
                          "the same modules once more, as free heap"))

    tokens = job.micro_batch_size * job.seq_len * job.sequences_per_example
    layers = shape.num_layers_with_grad
    per_layer = saved_per_token(shape, job)
    if shape.gradient_checkpointing:  # only each layer's input; backward recomputes one layer at a time
        kept = tokens * layers * shape.hidden_size * width
        how = f"{layers} layer inputs x {tokens:,} positions (checkpointing)"
    else:
        kept = tokens * layers * per_layer
        how = f"{layers} layers x {tokens:,} positions x {per_layer / 1024:.1f} KiB"
    parts.append(Part("activations kept for backward", kept, "accelerator", how))
    temporaries = tokens * temporaries_per_token(shape, job) * (layers if job.accelerator == "cpu" else 1)
    recompute = tokens * per_layer if shape.gradient_checkpointing else 0
    working = (tokens * per_layer + temporaries + recompute) if layers else 0
    parts.append(Part("working memory", working, "accelerator",
                      "one layer's gradients + forward temporaries" + (" of every layer (CPU allocator)"
                                                                       if job.accelerator == "cpu" else "")))

    eval_tokens = job.eval_batch_size * job.seq_len * job.sequences_per_example
    # Without autograd a layer holds at most its input and residual, the MLP's input and output, and the mask row.
    eval_layer = eval_tokens * (2 * shape.hidden_size + 2 * shape.intermediate_size + job.seq_len) * width
    eval_gathered = (gathered_elements(shape, job, evaluation=True) - gathered) * width if stage == 3 else 0
    training_transient = kept + working
    evaluation = eval_layer + eval_gathered
    if job.accelerator == "cuda":  # the caching allocator reuses training's blocks for evaluation
        evaluation = max(0.0, evaluation - training_transient)
    parts.append(Part("evaluation forward", evaluation, "accelerator",
                      f"one layer at eval batch {job.eval_batch_size}" + (" + modules kept gathered" if eval_gathered
                                                                          else "")))
    # The step flattens this rank's gradients into one fp32 tensor (ZeRO-1/2/3), and Adam builds its denominator
    # sqrt(v) + eps as a new tensor the size of what it updates: the whole partition, or one parameter without ZeRO.
    largest_trainable = max((n for n, trains in params if trains), default=0)
    step = trainable * 4 * 2 / ranks if stage >= 1 else largest_trainable * 4
    if job.accelerator == "cuda" and not job.offload_optimizer:  # reuses the freed activations' blocks
        step = max(0.0, step - training_transient)
    parts.append(Part("optimizer step temporaries", step, state_where,
                      "flat fp32 gradients + Adam's denominator" if stage >= 1 else "Adam's denominator"))
    parts.append(Part("process (python, torch, DeepSpeed, tokenizer)", PROCESS_OVERHEAD_BYTES, "host",
                      "measured RSS of a tiny-model run"))
    return parts


def in_memory(parts: list[Part]) -> float:
    """Bytes of one rank in memory (accelerator and host), leaving out what lives on NVMe."""
    return sum(p.bytes for p in parts if p.where != "nvme")


def format_table(parts: list[Part], title: str, *, accelerator: str) -> str:
    lines = [title, f"  {'part':<46} {'MiB':>10}  {'where':<11}  how"]
    for part in parts:
        lines.append(f"  {part.name:<46} {part.bytes / MIB:>10,.1f}  {part.where:<11}  {part.how}")
    if accelerator == "cpu":  # one memory: the process's RSS
        lines.append(f"  {'total per rank (peak RSS)':<46} {in_memory(parts) / MIB:>10,.1f}")
    else:
        for where in ("accelerator", "host"):
            total = sum(p.bytes for p in parts if p.where == where)
            lines.append(f"  {'total per rank on the ' + where:<46} {total / MIB:>10,.1f}")
    on_disk = sum(p.bytes for p in parts if p.where == "nvme")
    if on_disk:
        lines.append(f"  {'on NVMe per rank (not in memory)':<46} {on_disk / MIB:>10,.1f}")
    return "\n".join(lines)


def model_shape(model, *, gradient_checkpointing: bool = False) -> ModelShape:
    """Read a built `PromptModel` (best built on the meta device: `load_backbone(..., empty=True)`)."""
    from torch import nn

    from ipt_ds.methods.base import stack_position

    backbone = model.backbone
    config = backbone.model.config
    layers = list(backbone.layer_stack())
    modules = list(backbone.modules())
    position = stack_position(backbone)
    # Autograd keeps activations from the lowest trainable point up: the first layer whose computation depends on
    # trained parameters (methods/base.py).
    first = model.method.first_trained_layer
    in_backbone = {id(m) for m in modules}
    seen, units = set(), []
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        trains = any(p.requires_grad for p in params)
        lookup = isinstance(module, nn.Embedding)  # an index lookup passes no gradient to anything below it
        if id(module) in in_backbone:
            in_backward = trains or (not lookup and position(module) >= first and first < len(layers))
        else:
            in_backward = trains or not lookup
        units.append((tuple((p.numel(), p.requires_grad) for p in params), in_backward))
    hidden = backbone.hidden_size
    names = [name for name, _ in layers[0].named_modules()]

    def dropout(*keys: str) -> float:  # the first of these config entries, when the backbone keeps dropout on
        values = [float(getattr(config, k)) for k in keys if isinstance(getattr(config, k, None), int | float)]
        return values[0] if values and backbone.keep_dropout else 0.0

    return ModelShape(
        units=tuple(units), hidden_size=hidden, num_heads=backbone.num_heads,
        intermediate_size=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
        num_layers_with_grad=len(layers) - first, gated_mlp=any("gate" in name for name in names),
        linear_inputs_kept=any(p.requires_grad and p.dim() >= 2 for layer in layers for p in layer.parameters()),
        hidden_dropout=dropout("hidden_dropout_prob", "resid_pdrop", "hidden_dropout"),
        attention_dropout=dropout("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout"),
        gradient_checkpointing=gradient_checkpointing)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OFFLOAD = ("none", "optimizer", "all")


def report(cfg, *, world_size: int = 1, batch_size: int | None = None, seq_len: int | None = None,
           stage: int | None = None, dtype: str | None = None, offload: str | None = None,
           accelerator: str | None = None) -> tuple[str, list[Part], Job]:
    """Build the configured model on the meta device and estimate one rank's memory; returns (table, parts, job).

    Flags left as None come from the config: the per-rank micro-batch, data.max_length (+ the method's prompt
    positions), the ZeRO stage, precision and offload of the DeepSpeed JSON, and the accelerator from DS_ACCELERATOR."""
    import os

    import torch

    from ipt_ds.backbone import load_backbone
    from ipt_ds.data.tasks import get_task
    from ipt_ds.engine import drop_single_rank_zero, ds_dtype, fit_zero3_buckets, resolve_ds_config
    from ipt_ds.model import build_model
    from ipt_ds.recipes import recipe_class

    if recipe_class(cfg.data).kind == "image":
        raise ValueError("estimate-memory models token sequences; it does not cover image configs (data.format "
                         f"{cfg.data.format}); `ipt-ds estimate` counts their parameters")
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if offload is not None and offload not in OFFLOAD:
        raise ValueError(f"--offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
    # Reads and checks the JSON; batch divisibility and whether NVMe offload runs here are the launch's business.
    ds = resolve_ds_config(cfg, world_size=1, check_offload=False)
    if stage is not None:
        ds["zero_optimization"]["stage"] = stage
    else:
        drop_single_rank_zero(ds, world_size)  # as `ipt-ds train` does on one rank
    zero = ds["zero_optimization"]
    width = DTYPE_BYTES[dtype] if dtype else torch.tensor([], dtype=ds_dtype(ds)).element_size()
    with torch.device("meta"):
        loaded = load_backbone(cfg.model, dtype=torch.float32, with_lm_head=cfg.head.type in ("verbalizer", "lm"),
                               empty=True)
    if loaded[0].adapter.is_encoder_decoder:
        raise ValueError("estimate-memory models one transformer stack; it does not cover encoder-decoder backbones "
                         f"('{cfg.model.name_or_path}'); `ipt-ds estimate` counts their parameters")
    with torch.device("meta"):
        model, _ = build_model(cfg, get_task(cfg.data.task), dtype=torch.float32, ds_config=None, loaded=loaded)
    fit_zero3_buckets(ds, model.backbone.hidden_size)
    shape = model_shape(model, gradient_checkpointing=cfg.model.gradient_checkpointing)
    offloaded = {key: zero.get(f"offload_{key}", {}).get("device", "none") not in ("none", None)
                 for key in ("optimizer", "param")}
    if offload is not None:
        offloaded = {"optimizer": offload != "none", "param": offload == "all"}
    swap = zero.get("offload_param", {})
    nvme = offloaded["param"] and swap.get("device") == "nvme"
    prompt_positions = model.method.num_prefix_positions

    def setting(key: str):  # what the JSON sets, else DeepSpeed's default
        return zero.get(key, ZERO_DEFAULTS[key])

    job = Job(world_size=world_size, micro_batch_size=batch_size or cfg.train.micro_batch_size,
              eval_batch_size=cfg.train.eval_batch_size, seq_len=(seq_len or cfg.data.max_length) + prompt_positions,
              sequences_per_example=2 if cfg.head.siamese else 1, stage=zero.get("stage", 0), dtype_bytes=width,
              offload_optimizer=offloaded["optimizer"], offload_param=offloaded["param"], offload_param_nvme=nvme,
              nvme_swap_buffer_elements=int(swap.get("buffer_count", 5) * swap.get("buffer_size", 1e8)) if nvme else 0,
              overlap_comm=zero.get("overlap_comm", zero.get("stage") == 3),
              reduce_bucket_size=setting("reduce_bucket_size"),
              prefetch_bucket_size=setting("stage3_prefetch_bucket_size"),
              persistence_threshold=setting("stage3_param_persistence_threshold"),
              max_reuse_distance=setting("stage3_max_reuse_distance"),
              memory_efficient_linear=setting("memory_efficient_linear"),
              accelerator=accelerator or ("cpu" if os.environ.get("DS_ACCELERATOR") == "cpu" else "cuda"))
    parts = estimate(shape, job)
    title = (f"per-rank memory: {cfg.method.name} on {cfg.model.name_or_path}, ZeRO-{job.stage}, "
             f"{8 * width}-bit weights, {world_size} rank(s), micro-batch {job.micro_batch_size} x {job.seq_len} "
             f"positions ({shape.num_layers_with_grad} layers in autograd), {job.accelerator}")
    return format_table(parts, title, accelerator=job.accelerator), parts, job
