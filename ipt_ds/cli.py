"""`ipt-ds` command line (fire). Each command only parses and delegates; `--section.key=value` overrides any key.

  ipt-ds train CONFIG.yaml [--optim.lr=1e-3 ...]     train (under `deepspeed` for several ranks)
  ipt-ds evaluate RUN/best [--data.eval_split=val]   score an export on a split
  ipt-ds predict RUN/best --input=F --output=F.jsonl  predictions for a labelled or unlabelled file
  ipt-ds predict-mixed --exports=a=DIR,b=DIR --input=F --output=F.jsonl   rows of several tasks, one backbone
  ipt-ds estimate CONFIG.yaml [--key=value ...]      trainable / total parameter counts before a run
  ipt-ds estimate-memory CONFIG.yaml [--world_size=N]  per-rank memory before a run (frozen-aware)
  ipt-ds show-config CONFIG.yaml [--key=value ...]   print the resolved configuration
  ipt-ds methods | tasks                             list what is registered
  ipt-ds make-digits DIR                             sklearn's digits as images
  ipt-ds make-vit DIR                                a random-weight ViT
  ipt-ds pretrain CONFIG.yaml | build-corpus ...     commands of installed plugins (here `pretrain/`, docs/pretrain.md)

Other packages add commands through the `ipt_ds.commands` entry-point group; ipt_ds never imports them itself.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import traceback

import yaml

from ipt_ds.confload import ConfigError


def _setup(overrides: dict) -> None:
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise look for CUDA and fail
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _shutdown_distributed() -> None:
    """Leave the process group together; a rank that exits with gloo still up can abort at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.barrier()
        dist.destroy_process_group()
        # DeepSpeed's CPU collectives leave each rank's shared-memory buffer behind. Every rank has passed the barrier.
        from ipt_ds.failures import shm_buffer

        shm_buffer(rank).unlink(missing_ok=True)


def _user_errors(command):
    """Run a command; a user error prints one clear message and exits 2 (the traceback only with --run.debug).
    A run stopped by a stop signal exits 75 (preemption.py). Any other failure logs `rank R failed at step S: ...`
    with its traceback and exits 1. A rank that joined a process group leaves at once either way, so that no teardown
    waits on peers (see failures.py)."""
    @functools.wraps(command)  # fire's --help shows the command's docstring and arguments
    def wrapped(*args, **overrides):
        _setup(overrides)
        try:
            _check_arguments(command, args, overrides)
            result = command(*args, **overrides)
            _shutdown_distributed()
            return result
        except ValueError as err:  # ConfigError included
            if _debug(overrides):
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
            _exit(2)
        except Exception as err:
            from ipt_ds.failures import failure_message
            from ipt_ds.preemption import STOPPED_EXIT_CODE, Stopped

            if isinstance(err, Stopped):  # a stop signal: the checkpoint is saved, every rank leaves together
                _shutdown_distributed()
                _exit(STOPPED_EXIT_CODE)
            logging.getLogger("ipt_ds").exception(failure_message(err))
            _exit(1)

    # Shown to fire with every argument optional: fire would answer a missing one itself, with a usage block instead of
    # one `error:` line and exit status 2 (`_check_arguments` does that).
    signature = inspect.signature(command)
    wrapped.__signature__ = signature.replace(parameters=[
        p.replace(default=None) if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD else p
        for p in signature.parameters.values()])
    return wrapped


def _usage(name: str) -> str:
    """The command's line of this module's docstring, e.g. `ipt-ds train CONFIG.yaml [--optim.lr=1e-3 ...]`."""
    lines = [line.strip() for line in (__doc__ or "").splitlines() if line.strip().startswith(f"ipt-ds {name} ")]
    return lines[0].split("  ")[0] if lines else f"ipt-ds {name} ..."


def _positional(command) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(command).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]


def _unexpected_argument(name: str, command, argv: list[str]) -> str | None:
    """The first word of `argv` that the command has no place for, read as fire reads it (`--flag VALUE` takes the
    word after a flag without `=`). Fire would run the command first and complain about that word afterwards."""
    words, after_flag = [], False
    for token in argv:
        if token.startswith("-"):
            after_flag = "=" not in token
        elif after_flag:
            after_flag = False
        else:
            words.append(token)
    num_params = len(_positional(command))
    if len(words) <= num_params:
        return None
    return (f"ipt-ds {name}: unexpected argument {words[num_params]!r} (settings are --section.key=value); usage: "
            f"{_usage(name)}")


def _check_arguments(command, args: tuple, overrides: dict) -> None:
    """A required argument left out is a user error naming it (fire hands it over as None, see `_user_errors`)."""
    params = _positional(command)
    given = {**dict(zip((p.name for p in params), args)), **overrides}
    name = command.__name__.replace("_", "-")
    usage = _usage(name)
    missing = [f"--{p.name}" if i or f"--{p.name}=" in usage else p.name.upper() for i, p in enumerate(params)
               if p.default is p.empty and given.get(p.name) is None]
    if missing:
        raise ValueError(f"ipt-ds {name}: missing {', '.join(missing)}; usage: {usage} "
                         f"(`ipt-ds {name} --help` lists every option)")


def _debug(overrides: dict) -> bool:
    """--run.debug as typed: fire hands `--run.debug=false` over as the (truthy) string 'false'."""
    from ipt_ds.confload import convert

    try:
        return convert(overrides.get("run.debug", False), bool)
    except ValueError:
        return False


def _exit(code: int) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from ipt_ds.failures import exit_now

        exit_now(code)
    sys.exit(code)


@_user_errors
def train(config: str, **overrides):
    """Train with CONFIG (YAML); override any key with --section.key=value."""
    from ipt_ds import preemption

    preemption.install(preemption.DEFAULT_STOP_SIGNALS)  # before the heavy imports: keep a signal sent at start-up
    from ipt_ds.config import load_config
    from ipt_ds.loop import train as run

    run(load_config(config, overrides))


@_user_errors
def evaluate(export: str, **overrides):
    """Score an export directory (e.g. runs/x/best) on data.eval_split; prints one JSON line."""
    from ipt_ds.infer import evaluate_export

    evaluate_export(export, overrides)


@_user_errors
def predict(export: str, input: str, output: str, **overrides):  # noqa: A002 - the flag users type is --input
    """Write predictions (jsonl: guid, prediction, scores) for the examples in --input to --output."""
    from ipt_ds.infer import predict_export

    predict_export(export, input, output, overrides)


@_user_errors
def predict_mixed(exports: str, input: str, output: str, batch_size: int = 32, **overrides):  # noqa: A002
    """Predict a jsonl file mixing tasks; each row's `export` field names one of --exports=name=DIR,...
    --model.trust_remote_code=true lets the exports' backbones run their own code (no export can ask for it)."""
    from ipt_ds import mixed

    unknown = sorted(set(overrides) - {"model.trust_remote_code", "run.debug"})
    if unknown:
        raise ValueError(f"predict-mixed: unknown flags {', '.join('--' + k for k in unknown)}; it takes --exports, "
                         "--input, --output, --batch_size, --model.trust_remote_code and --run.debug")
    remote = {k: v for k, v in overrides.items() if k == "model.trust_remote_code"}
    mixed.predict_mixed(mixed.parse_exports(exports), input, output, batch_size=batch_size, overrides=remote)


@_user_errors
def estimate(config: str | None = None, **overrides):
    """Print trainable and total parameter counts for CONFIG before any run (loads the backbone once, no DeepSpeed)."""
    import torch

    from ipt_ds.config import load_config
    from ipt_ds.recipes import recipe_for

    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.run.seed)
    model = recipe_for(cfg).load_model(dtype=torch.float32, ds_config=None)
    counts = model.parameter_report()
    print(f"method {cfg.method.name} on {cfg.model.name_or_path}")
    for part in ("method", "head"):
        module = getattr(model, part)
        print(f"  {part:<9} {sum(p.numel() for p in module.parameters() if p.requires_grad):>14,} trainable")
    print(f"  backbone  {sum(p.numel() for p in model.backbone.parameters() if p.requires_grad):>14,} trainable "
          f"of {counts['backbone']:,}")
    print(f"  total     {counts['trainable']:>14,} trainable of {counts['total']:,} "
          f"({100 * counts['trainable'] / counts['backbone']:.3f} % of the backbone)")


@_user_errors
def estimate_memory(config: str | None = None, world_size: int = 1, batch_size: int | None = None,
                    seq_len: int | None = None, stage: int | None = None, dtype: str | None = None,
                    offload: str | None = None, accelerator: str | None = None, **overrides):
    """Print one rank's memory for CONFIG on --world_size ranks (builds the model on the meta device, reads no weights).

    --batch_size: per-rank micro-batch (default train.micro_batch_size); --seq_len: tokens per input before prompt
    positions (default data.max_length); --stage 0-3, --dtype fp32|bf16|fp16, --offload none|optimizer|all default to
    the DeepSpeed JSON; --accelerator cpu|cuda defaults to cpu when DS_ACCELERATOR=cpu."""
    from ipt_ds.config import load_config
    from ipt_ds.memory import report

    table, *_ = report(load_config(config, overrides), world_size=world_size, batch_size=batch_size, seq_len=seq_len,
                       stage=stage, dtype=dtype, offload=offload, accelerator=accelerator)
    print(table)


@_user_errors
def show_config(config: str | None = None, **overrides):
    """Print the resolved configuration (defaults < YAML < flags), with the run directory and the data root that a run
    would use (empty settings filled in, made absolute)."""
    from pathlib import Path

    from ipt_ds.config import load_config
    from ipt_ds.data.readers import default_data_root

    cfg = load_config(config, overrides)
    shown = cfg.to_dict()
    shown["run"]["output_dir"] = str(cfg.output_path().absolute())
    root = Path(cfg.data.root) if cfg.data.root else default_data_root()
    if cfg.data.format != "hub" and root is not None:
        shown["data"]["root"] = str(root.absolute())
    print(yaml.safe_dump(shown, sort_keys=False), end="")
    if shown["data"]["root"] == "":
        print("# data.root: no local data root ($IPT_DS_DATA, ../shared/data): splits are read from the HF hub")


@_user_errors
def make_digits(directory: str, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                format: str = "npz"):  # noqa: A002 - the flag users type is --format
    """Write scikit-learn's 8x8 digits to DIRECTORY (new or empty) as train, val and test splits (stratified, drawn
    with --seed), as npz files or (--format=imagefolder) PNG files in class folders."""
    from ipt_ds.data.images import write_digits

    sizes = write_digits(directory, seed=int(seed), val_fraction=float(val_fraction),
                         test_fraction=float(test_fraction), layout=str(format))
    print(f"wrote {', '.join(f'{n} {split}' for split, n in sizes.items())} images of 10 classes to {directory} "
          f"({format})")


@_user_errors
def make_vit(directory: str, image_size: int = 32, patch_size: int = 4, hidden_size: int = 64, num_layers: int = 4,
             num_heads: int = 4, intermediate_size: int = 128, num_channels: int = 3, initializer_range: float = 0.02,
             seed: int = 0):
    """Save a ViT with random weights to DIRECTORY (new or empty), for tests and the digits demo: frozen random
    weights show that the mechanism works, not what a pretrained ViT reaches."""
    from ipt_ds.recipes.image import make_vit as make

    sizes = {"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden_size, "num_layers": num_layers,
             "num_heads": num_heads, "intermediate_size": intermediate_size, "num_channels": num_channels,
             "seed": seed}
    make(directory, **{k: int(v) for k, v in sizes.items()}, initializer_range=float(initializer_range))
    print(f"saved a random-weight ViT ({', '.join(f'{k}={v}' for k, v in sizes.items())}) to {directory}")


def methods():
    """List registered methods with their options."""
    import dataclasses

    from ipt_ds.confload import default_text
    from ipt_ds.methods import METHODS

    for name, spec in sorted(METHODS.items()):
        options = ", ".join(f"{f.name}={default_text(f)}" for f in dataclasses.fields(spec.config_cls)
                            if f.name != "name")
        print(f"{name}: {options or '(no options)'}")


def tasks():
    """List known tasks with their labels and metrics."""
    from ipt_ds.data.tasks import TASKS
    from ipt_ds.recipes import text_recipe_class

    for name, task in sorted(TASKS.items()):
        print(f"{name}: {text_recipe_class(task).outputs(task)}; metrics {', '.join(task.metrics)}")


def _plugin_commands() -> dict:
    """Commands registered under the `ipt_ds.commands` entry points (name -> function), run like the built-in ones."""
    from importlib.metadata import entry_points

    return {entry.name: _user_errors(entry.load()) for entry in entry_points(group="ipt_ds.commands")}


def commands() -> dict:
    """Every command by the name users type: the built-in ones and those of installed plugins."""
    return {**_plugin_commands(), "train": train, "evaluate": evaluate, "predict": predict, "estimate": estimate,
            "show-config": show_config, "methods": methods, "tasks": tasks, "predict-mixed": predict_mixed,
            "estimate-memory": estimate_memory, "make-digits": make_digits, "make-vit": make_vit}


def main() -> None:
    import fire

    # The deepspeed launcher puts --local_rank=N before the command; LOCAL_RANK in the environment carries it too.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    if "--" not in sys.argv and any(a in ("-h", "--help") for a in sys.argv[2:]):
        # Every command takes **overrides, which would swallow --help as a setting; fire shows help after `--`.
        sys.argv = [a for a in sys.argv if a not in ("-h", "--help")] + ["--", "--help"]
    known = commands()
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-") and sys.argv[1] not in known:
        print(f"error: unknown command '{sys.argv[1]}'; commands: {', '.join(known)} (`ipt-ds --help`)",
              file=sys.stderr)
        sys.exit(2)
    command = known.get(sys.argv[1]) if len(sys.argv) > 2 else None
    unexpected = command and _unexpected_argument(sys.argv[1], command, sys.argv[2:])
    if unexpected:
        print(f"error: {unexpected}", file=sys.stderr)
        sys.exit(2)
    try:
        fire.Fire(known, name="ipt-ds")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
