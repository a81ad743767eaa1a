"""A minimal greedy driver of ModelRunner for model tests: naive block allocation, chosen
chunk sizes and arrival steps, no scheduler (that is tested on its own)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from genserve.config import CacheConfig
from genserve.engine.model_runner import ModelRunner
from genserve.engine.request import Request
from genserve.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from genserve.models.loader import load_config, load_model


@dataclass
class Seq:
    req: Request
    arrival: int
    chunk: int
    steps: int  # tokens to generate
    logits: list[torch.Tensor] = field(default_factory=list)


def make_runner(model_dir, dtype=torch.float32, block_size=4, num_blocks=512) -> ModelRunner:
    cfg = load_config(model_dir)
    model = load_model(model_dir, dtype, cfg)
    return ModelRunner(model, cfg, CacheConfig(block_size=block_size, num_blocks=num_blocks), dtype)


def run_greedy(runner: ModelRunner, seqs: list[Seq]) -> None:
    next_block = 1  # block 0 is scratch
    step = 0
    while any(len(s.req.output_token_ids) < s.steps for s in seqs):
        scheduled = []
        for s in seqs:
            r = s.req
            if step < s.arrival or len(r.output_token_ids) >= s.steps:
                continue
            n = min(s.chunk, r.num_tokens - r.num_computed_tokens)
            need = -(-(r.num_computed_tokens + n) // runner.block_size)
            while len(r.block_table) < need:
                r.block_table.append(next_block)
                next_block += 1
            scheduled.append(ScheduledRequest(r, n))
        if scheduled:
            logits, _ = runner.execute(SchedulerOutput(scheduled))
            sampling = [s for s in scheduled if s.samples]
            for s in scheduled:
                s.request.num_computed_tokens += s.num_new_tokens
            for sr, row in zip(sampling, logits, strict=True):
                seq = next(q for q in seqs if q.req is sr.request)
                seq.logits.append(row)
                sr.request.append_output_token(int(row.argmax()))
        step += 1


def reference_greedy(
    hf_model, prompt: list[int], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own incremental greedy loop (with its KV cache, as `generate` runs):
    the definition of correct greedy tokens and logits."""
    out, logits = [], []
    past = None
    feed = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            res = hf_model(feed, past_key_values=past, use_cache=True)
            past = res.past_key_values
            row = res.logits[0, -1].float()
            tok = int(row.argmax())
            logits.append(row)
            out.append(tok)
            feed = torch.tensor([[tok]])
    return out, logits
