"""The `supervised` source's generator: SmolLM2 (or any causal / seq2seq model) fine-tuned on the
train split's human pairs, "Passage: ...\\nQuery: ..." with the loss on the query tokens only."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from drscaling.annotation.config import FinetuneConfig, digest
from drscaling.annotation.human import positives
from drscaling.annotation.local import device_name, load_model, truncate_tokens
from drscaling.annotation.prompts import PASSAGE_PROMPT, PASSAGE_QUERY_PROMPT
from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, finite_copy, read_json, write_json

log = logging.getLogger(__name__)

GENERATOR_META = "drscaling_generator.json"


def finetune_examples(tokenizer, pairs: pd.DataFrame, cfg: FinetuneConfig, seq2seq: bool):
    """(input_ids, labels) per pair. Decoder: prompt + " query<eos>", labels -100 on the prompt so
    only the query tokens are learnt. Seq2seq: passage in, query out."""
    eos = tokenizer.eos_token_id
    examples = []
    for passage, query in zip(pairs["passage"], pairs["query"], strict=True):
        cut = truncate_tokens(tokenizer, passage, cfg.max_passage_tokens)
        q_ids = tokenizer(" " + " ".join(query.split()), add_special_tokens=False)["input_ids"][:cfg.max_query_tokens] + [eos]
        if seq2seq:
            examples.append((tokenizer(PASSAGE_PROMPT.format(passage=cut))["input_ids"], q_ids))
        else:
            p_ids = tokenizer(PASSAGE_QUERY_PROMPT.format(passage=cut), add_special_tokens=False)["input_ids"]
            examples.append((p_ids + q_ids, [-100] * len(p_ids) + q_ids))
    return examples


def _collate(examples, pad_id: int, seq2seq: bool):
    import torch

    width_in = max(len(i) for i, _ in examples)
    width_lab = max(len(lab) for _, lab in examples)
    ids = torch.full((len(examples), width_in), pad_id)
    mask = torch.zeros((len(examples), width_in), dtype=torch.long)
    labels = torch.full((len(examples), width_in if not seq2seq else width_lab), -100)
    for i, (inp, lab) in enumerate(examples):
        ids[i, :len(inp)] = torch.tensor(inp)
        mask[i, :len(inp)] = 1
        labels[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _training_pairs(prepared: str | Path, exclude_pids: Sequence[str]) -> pd.DataFrame:
    pairs = positives(prepared)
    pairs = pairs[~pairs["pid"].isin(set(exclude_pids))]
    pairs = pairs[pairs["query"].map(lambda q: isinstance(q, str) and bool(q.strip()))]
    if pairs.empty:
        raise DrscalingError(
            "no human pairs left to fine-tune on: every train passage is a generation target. Set a "
            "limit, or holdout_targets=False (the paper's docT5query also saw its training passages)")
    return pairs


def _train(net, tok, pairs: pd.DataFrame, cfg: FinetuneConfig, seq2seq: bool) -> list[float]:
    """cfg.steps AdamW steps over `pairs` in a seeded order; the loss of each step."""
    import torch

    device = str(next(net.parameters()).device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    order = rng.permutation(len(pairs))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    net.train()
    losses: list[float] = []
    for step in tqdm(range(cfg.steps), desc="fine-tune generator", unit="step"):
        idx = [order[(step * cfg.batch_size + j) % len(order)] for j in range(cfg.batch_size)]
        batch = _collate(finetune_examples(tok, pairs.iloc[idx], cfg, seq2seq), tok.pad_token_id, seq2seq)
        loss = net(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # a few noisy steps must not wreck the base model
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
    net.eval()
    return losses


def finetune_generator(
    prepared: str | Path, dest: str | Path, cfg: FinetuneConfig | None = None,
    exclude_pids: Sequence[str] = (), cache_dir: str | Path | None = None,
) -> dict:
    """Fine-tune the base model on the train split's human pairs (minus `exclude_pids`) and save
    it to `dest` atomically, with drscaling_generator.json (settings, losses, time, cost).
    An existing `dest` with the same settings and exclusions is reused."""
    cfg = cfg or FinetuneConfig()
    if cfg.steps < 0 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise DrscalingError(f"fine-tuning needs steps >= 0, batch_size >= 1, lr > 0 (got {cfg.steps}, {cfg.batch_size}, {cfg.lr})")
    dest = Path(dest)
    from drscaling.tracking import file_version

    key = digest([cfg.fingerprint(), sorted(exclude_pids), file_version(Path(prepared) / "train")])
    meta_file = dest / GENERATOR_META
    if meta_file.exists() and read_json(meta_file).get("key") == key:
        log.info("reusing fine-tuned generator %s", dest)
        return read_json(meta_file)
    pairs = _training_pairs(prepared, exclude_pids)
    net, tok, seq2seq, where = load_model(cfg.base_model, cfg.device, cache_dir)
    started = time.perf_counter()
    losses = _train(net, tok, pairs, cfg, seq2seq)
    seconds = time.perf_counter() - started
    info = {
        "key": key, "settings": asdict(cfg), "base_model": where, "seq2seq": seq2seq,
        "train_pairs_available": len(pairs), "excluded_passages": len(set(exclude_pids)),
        "saw_generation_targets": not cfg.holdout_targets, "losses": losses, "seconds": seconds,
        "device": device_name(str(next(net.parameters()).device)), "usd": seconds / 3600.0 * cfg.usd_per_device_hour,
        "format": "seq2seq: passage -> query" if seq2seq else PASSAGE_QUERY_PROMPT + " {query}<eos>",
    }
    with atomic_path(dest) as tmp:
        net.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / GENERATOR_META, finite_copy(info))  # strict JSON: a diverged loss as null
    return info
