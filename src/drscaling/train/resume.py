"""Resuming: the checkpoint of an unfinished run (written whole or not at all, refused before any
compute when it cannot continue this run) and the metrics of a run already finished with the same
parameters on the same data. (SIGTERM becomes a checkpoint at a step boundary: train.run with
drscaling.signals.sigterm_at_boundary.)"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from drscaling.design import METRICS_FILE
from drscaling.errors import DrscalingError
from drscaling.files import NoRoomError, atomic_path
from drscaling.model.encoder import Towers
from drscaling.train.config import TrainConfig

CHECKPOINT_DIR = "checkpoint"  # <out>/checkpoint/checkpoint.pt while a run is unfinished


def save_checkpoint(path: Path, towers: Towers, opt, sched, state: dict) -> None:
    """Write the checkpoint whole or not at all: the previous one stays until the new one is complete."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        try:
            torch.save(
                {"model": towers.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "torch_rng": torch.get_rng_state(), "state": state},
                tmp / "checkpoint.pt",
            )
        except RuntimeError as exc:  # torch's zip writer reports a failed write (no room) without an errno
            raise NoRoomError(path, f"torch.save failed: {str(exc).strip()[:200]}") from exc


def read_checkpoint(path: Path, cfg: TrainConfig, data_key: str = "") -> dict | None:
    """The saved checkpoint of an interrupted run, or None; read before anything is built, so a
    checkpoint that cannot be resumed is refused before any compute. Refuses, with what to do, one
    that is unreadable, was made for another shape, with other parameters or on other data. Only
    tensors and plain containers are unpickled (weights_only)."""
    file = path / "checkpoint.pt"
    if not file.exists():
        return None
    # Named for every command that trains: a sweep or study point has no --discard-checkpoint flag.
    discard = (f"delete {path} to start {cfg.shape} afresh (`drscaling train`: rerun with --discard-checkpoint,"
               " which deletes it)")
    try:
        ck = torch.load(file, weights_only=True)
        state = ck["state"]
    except pickle.UnpicklingError as exc:  # torch's own text advises weights_only=False: never here
        raise DrscalingError(f"checkpoint {file} holds objects other than tensors and plain containers, which are"
                             f" not loaded (unpickling them could run code); {discard}") from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, missing keys: all unusable
        raise DrscalingError(f"checkpoint {file} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); {discard}") from exc
    if state.get("shape") != cfg.shape:
        raise DrscalingError(
            f"checkpoint {path} was made for shape {state.get('shape')}, not {cfg.shape}: its weights cannot"
            f" continue another shape; use another output folder or {discard}"
        )
    if state.get("config_key") != cfg.key():
        raise DrscalingError(
            f"checkpoint {path} was made with different parameters (shape {state.get('shape')});"
            " use another output folder or delete the checkpoint"
        )
    if data_key and state.get("data_key") != data_key:
        raise DrscalingError(
            f"checkpoint {path} was trained on other data (the annotations, the prepared splits or the init"
            " checkpoint's weights changed"
            f" since); resuming would mix both: {discard}"
        )
    return ck


def restore_checkpoint(ck: dict, path: Path, cfg: TrainConfig, towers: Towers, opt, sched) -> dict:
    """Load a checkpoint read by read_checkpoint into the built towers, optimiser and schedule; returns
    the run's saved state. (The torch generator is restored by the caller, last.)"""
    try:
        towers.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise DrscalingError(f"checkpoint {path} does not fit shape {cfg.shape}: {exc}") from exc
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    return ck["state"]


def finished(out: Path, cfg: TrainConfig, data_key: str) -> dict | None:
    """The metrics of a finished run with the same parameters on the same data, if there is one."""
    file = out / METRICS_FILE
    if not file.exists():
        return None
    done = json.loads(file.read_text())
    if done.get("config_key") == cfg.key() and done.get("data_key") == data_key:
        return done
    return None
