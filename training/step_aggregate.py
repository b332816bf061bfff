"""The aggregate step: micro-models folder -> global model folder (weights n_k / n, by the job's strategy).

A plain function over folders; the aggregate component (components/steps.py) is one call into it. Folder arguments
may be local paths or gs:// URIs: inputs are staged in (only the files the step reads), the output is written
locally and uploaded when the step succeeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from microfed.training.aggregation import check_same_architecture
from microfed.training.errors import MicrofedError
from microfed.training.evaluation import evaluate
from microfed.training.io import read_json, read_safetensors, write_json
from microfed.training.layout import (
    AGGREGATE_FILE,
    BEST_ROUND_FILE,
    DATASET_FILE,
    JOB_FILE,
    MODEL_CONFIG_FILE,
    ROUNDS_FILE,
    SERVER_STATE_FILE,
    VAL_FILES,
    parse_job_record,
    read_job_record,
    worker_record_file,
)
from microfed.training.model_files import ModelCard, save_model
from microfed.training.models import build_model
from microfed.training.shards import load_val_set
from microfed.training.step_log import log, step
from microfed.training.storage import exists, join, read_bytes, staged_input, staged_output
from microfed.training.strategies import Strategy, unpack_server_state
from microfed.training.train import Preprocess

__all__ = ["aggregate_step"]


@step("aggregate")
def aggregate_step(
    micro_dir: str | Path, out_dir: str | Path, shards_dir: str | Path | None = None, batch_size: int = 512
) -> dict[str, Any]:
    """Combine the micro-models listed in the job record (JOB_FILE) by the job's strategy (its `combine_final`: the
    weighted average, n_k / n, and a server optimizer's last step; ddp's single model passed through) and write the
    global model.

    With `shards_dir` holding a validation split, the result is round R's model or the best earlier round's,
    whichever has the higher validation accuracy (ties: the earlier round).
    """
    start = time.perf_counter()
    # only what the average reads: not the workers' logs or checkpoints
    extra = [f for f in (ROUNDS_FILE, BEST_ROUND_FILE, SERVER_STATE_FILE) if exists(join(micro_dir, f))]
    files = [JOB_FILE, MODEL_CONFIG_FILE, *_micro_model_files(micro_dir), *extra]
    with contextlib.ExitStack() as stack:
        micro = stack.enter_context(staged_input(micro_dir, only=files))
        shards = None
        if shards_dir is not None and exists(join(shards_dir, VAL_FILES.manifest)):
            shards = stack.enter_context(staged_input(shards_dir, only=[DATASET_FILE, *VAL_FILES]))
        out = stack.enter_context(staged_output(out_dir))
        record = _aggregate(micro, out, shards, batch_size)
        record["seconds"] = time.perf_counter() - start
        write_json(out / AGGREGATE_FILE, record)
    return record


def _micro_model_files(micro_dir: str | Path) -> list[str]:
    uri = join(micro_dir, JOB_FILE)
    job = parse_job_record(json.loads(read_bytes(uri)), uri)
    return [w["file"] for w in job["workers"]]


def _aggregate(micro: Path, out: Path, shards: Path | None, batch_size: int) -> dict[str, Any]:
    job = read_job_record(micro)
    states, weights, names, metas = [], [], [], []
    for w in job["workers"]:
        state, meta = read_safetensors(micro / w["file"])
        metas.append(meta)
        if meta.get("n_k") != str(w["n_k"]):
            raise MicrofedError(
                f"{micro / w['file']}: n_k {meta.get('n_k')} in the file disagrees with "
                f"{worker_record_file(w['rank'])} ({w['n_k']})"
            )
        states.append(state)
        weights.append(float(w["n_k"]))
        names.append(f"micro-model of worker {w['rank']} ({w['file']})")
    card = ModelCard.from_dict(read_json(micro / MODEL_CONFIG_FILE), str(micro / MODEL_CONFIG_FILE))
    check_same_architecture(metas, names)
    rounds = read_json(micro / ROUNDS_FILE) if (micro / ROUNDS_FILE).exists() else {}
    strategy = Strategy(**rounds.get("strategy", {}))
    n = int(sum(weights))
    # a server optimizer's state, when the job left it: the global model round R started from, and its moments
    server = None
    if (micro / SERVER_STATE_FILE).exists():
        server = unpack_server_state(read_safetensors(micro / SERVER_STATE_FILE)[0])
    model_state, how = strategy.build().combine_final(states, weights, names=names, server=server)
    record: dict[str, Any] = {
        "num_examples": n,
        "micro_models": len(states),
        "weights": [w / n for w in weights],
        "strategy": dataclasses.asdict(strategy),
        "rounds": int(rounds.get("stopped_after_round", job.get("config", {}).get("rounds", 0)) or 0),
    }
    record.update(_select(shards, rounds, record["rounds"], model_state, card, batch_size))
    if record.get("selected_round") not in (None, record["rounds"]):
        model_state, _ = read_safetensors(micro / BEST_ROUND_FILE)
    save_model(
        out,
        model_state,
        card,
        metadata={"n": str(n), "micro_models": str(len(states)), "round": str(record.get("selected_round") or "")},
    )
    log(f"aggregate: {how}")
    return record


def _select(
    shards: Path | None,
    rounds: dict[str, Any],
    last: int,
    final: dict[str, torch.Tensor],
    card: ModelCard,
    batch_size: int,
) -> dict[str, Any]:
    """Validation accuracy of every round (the job's records plus the final model's, measured here) and the
    round to keep; nothing when no validation split was held out."""
    if shards is None:
        return {}
    val = load_val_set(shards)
    if val is None:
        return {}
    model = build_model(card.architecture)
    model.load_state_dict(final)
    pre = Preprocess(list(card.mean), list(card.std), device=torch.device("cpu"))
    res = evaluate(
        model, val.images, val.labels, preprocess=pre, num_classes=card.architecture.num_classes, batch_size=batch_size
    )
    history = [r for r in rounds.get("val", []) if r["round"] != last]
    history.append({"round": last, "val_accuracy": res.accuracy, "val_loss": res.loss})
    best = rounds.get("best_round")
    selected = last
    if best is not None and rounds.get("best_file") and float(rounds["best_val_accuracy"]) >= res.accuracy:
        selected = int(best)
    chosen = next(r for r in history if r["round"] == selected)
    log(
        f"aggregate: validation accuracy by round {[round(r['val_accuracy'], 4) for r in history]}; "
        f"keeping round {selected} ({chosen['val_accuracy']:.4f})"
    )
    return {"val_history": history, "selected_round": selected, "val_accuracy": chosen["val_accuracy"]}
