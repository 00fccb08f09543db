"""Prediction for a file that mixes tasks: each row names the export that answers it, over one shared backbone.

    ipt-ds predict-mixed --exports=rte=runs/rte/best,cb=runs/cb/best --input=mixed.jsonl --output=preds.jsonl

Every jsonl row holds the fields its task reads (e.g. premise and hypothesis for RTE) and `export`, the name of one
of --exports. Exports whose method leaves the backbone untouched (prompt and prefix methods, IPT, LPT, linear probe)
share one frozen backbone in memory, whatever their method; an export that trained backbone weights (full, BitFit)
gets its own copy. Rows are batched per export; the output keeps the input order, one line per input row:
{"line", "export", "prediction", "scores"}. One process without DeepSpeed, fp32: this is the serving path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ipt_ds import checkpoint
from ipt_ds.config import config_from_dict
from ipt_ds.data.encode import TextEncoder, collate
from ipt_ds.data.tasks import Task, examples_from_record, get_task
from ipt_ds.model import PromptModel, build_model
from ipt_ds.recipes.text import to_prediction

log = logging.getLogger("ipt_ds")
ROUTE = "export"


@dataclass
class Route:
    model: PromptModel
    encoder: TextEncoder
    task: Task
    fields: dict[str, str] | None


def parse_exports(spec: str | dict) -> dict[str, str]:
    """`name=dir,name=dir` (or fire's dict) -> {name: dir}."""
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    pairs = [item.partition("=") for item in str(spec).split(",") if item]
    if not pairs or any(not name or not sep or not path for name, sep, path in pairs):
        raise ValueError(f"--exports '{spec}': expected name=export_dir[,name=export_dir...]")
    return {name: path for name, _, path in pairs}


def load_routes(exports: dict[str, str], overrides: dict | None = None) -> dict[str, Route]:
    """Build every export's model; those that keep the backbone frozen share one loaded backbone."""
    shared: dict[tuple, tuple] = {}
    routes = {}
    for name, directory in exports.items():
        meta, tensors = checkpoint.read_export(Path(directory))
        cfg = config_from_dict(meta["config"], dict(overrides or {}), source=f"{directory}/{checkpoint.EXPORT_CONFIG}")
        task = get_task(cfg.data.task)
        owns_backbone = any(key.startswith("backbone.") for key in tensors)
        key = (cfg.model.name_or_path, cfg.model.gguf_file, cfg.head.type == "verbalizer")
        model, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None,
                                     loaded=None if owns_backbone else shared.get(key))
        if not owns_backbone:
            shared.setdefault(key, (model.backbone, encoder.tokenizer))
        checkpoint.load_trainable(model, tensors, source=directory)
        routes[name] = Route(model.eval(), encoder, task, cfg.data.fields or None)
        log.info("export %s: %s on %s (%s backbone)", name, cfg.method.name, cfg.model.name_or_path,
                 "own" if owns_backbone else "shared")
    return routes


def read_rows(path: Path, names: set[str]) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise ValueError(f"--input '{path}': no such file")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({err.msg}); one JSON object per line") from None
        if not isinstance(record, dict) or record.get(ROUTE) not in names:
            raise ValueError(f"{path}:{lineno}: '{ROUTE}' must name one of the exports {sorted(names)}, got "
                             f"{record.get(ROUTE) if isinstance(record, dict) else record!r}")
        rows.append((lineno, record))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@torch.no_grad()
def predict_mixed(exports: dict[str, str], input_path: str, output_path: str, *, batch_size: int = 32,
                  overrides: dict | None = None) -> list[dict]:
    """`overrides`: `--section.key=value` flags for every export's config (the command line takes only
    model.trust_remote_code, which no export can switch on by itself)."""
    out, path = checkpoint.new_output_file(output_path), Path(input_path)
    rows = read_rows(path, set(exports))  # before any model is loaded
    routes = load_routes(exports, overrides)
    results: dict[int, dict] = {}
    for name, route in routes.items():
        mine = [(lineno, examples_from_record(route.task, record, guid=f"line{lineno}", where=f"{path}:{lineno}",
                                              fields=route.fields))
                for lineno, record in rows if record[ROUTE] == name]
        if any(len(examples) != 1 for _, examples in mine):
            raise ValueError(f"export {name}: task '{route.task.name}' expands one row into several examples, "
                             "which mixed prediction does not support; use `ipt-ds predict` for it")
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = collate([route.encoder(examples[0]) for _, examples in chunk], route.encoder.tokenizer.pad_token_id)
            batch.pop("labels", None)
            logits, _ = route.model(batch)
            for (lineno, _), score in zip(chunk, logits.float().tolist()):
                pred = to_prediction(score, route.task)
                label = pred if route.task.is_regression else route.task.label_names[pred]
                results[lineno] = {"line": lineno, "export": name, "prediction": label, "scores": score}
    lines = [results[lineno] for lineno, _ in rows]
    checkpoint.atomic_write_text(out, "".join(json.dumps(line) + "\n" for line in lines))
    log.info("wrote %d predictions from %d exports to %s", len(lines), len(routes), out)
    return lines
