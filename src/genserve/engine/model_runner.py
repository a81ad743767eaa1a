"""The only place that turns a SchedulerOutput into tensors and runs the model.

It owns the paged KV cache (one K and one V tensor per layer, split into blocks) and knows
nothing about scheduling: given which tokens of which requests to compute, with their blocks,
it returns the logits of the last token of each request whose chunk reaches its end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from genserve import allocator, hugepages
from genserve.config import CacheConfig, ModelConfig
from genserve.engine.forward_context import ForwardContext, PrefillSeq, forward_context
from genserve.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from genserve.kernels.cpu import TORCH, KernelSet, kernel_set
from genserve.models.base import CausalLM, StepFn
from genserve.sampling.sampler import argmax_rows, chosen_logprobs

log = logging.getLogger(__name__)


def available_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    """Blocks that fit the memory budget (--kv-cache-memory, else a fraction of free RAM)."""
    if cache.num_blocks:
        return cache.num_blocks
    budget = cache.memory_bytes or int(available_memory_bytes() * cache.memory_fraction)
    blocks = budget // kv_bytes_per_block(cfg, cache.block_size, dtype)
    if blocks < 2:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds no block; raise --kv-cache-memory"
        )
    return int(blocks)


# kernel set -> step kind -> the whole-step fast paths the model is asked for, in order
# (`CausalLM.decode_fast_path`); a step the table or the model leaves out runs `model.forward`.
# Each path gives the values `forward` gives on that set, so a row's tokens do not depend on
# the path its step took (tests/engine/test_batch_invariance.py).
# `stack`: every layer of a pure-decode step in one native call on the packed linears; `layer`:
# the fused layer kernel on the plain weights (1-2 rows), where the packing did not fit.
STEP_PATHS: dict[str, dict[str, tuple[str, ...]]] = {
    "amx": {"decode": ("stack", "layer")},
    "avx512-bf16": {"decode": ("stack", "layer")},
    "avx2-fma": {"decode": ("stack", "layer")},
    TORCH: {},
}


def step_kind(ctx: ForwardContext) -> str:
    return "mixed" if ctx.prefills else "decode"


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    ctx: ForwardContext
    logits_rows: torch.Tensor  # [N] rows whose hidden state is sampled, in scheduled order
    first_row: dict[str, int]  # request id -> its first row in the flat batch


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        cfg: ModelConfig,
        cache: CacheConfig,
        dtype: torch.dtype,
        native_kernels: bool = True,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.dtype = dtype
        self.block_size = cache.block_size
        allocator.retain_step_buffers()  # steps reuse their buffers' memory without faults
        self.kernels = kernel_set() if native_kernels else KernelSet(TORCH, "native kernels off")
        # before sizing the KV cache from free memory: a packed weight copy takes its share first
        self.packed_bytes = model.bind_kernels(self.kernels.name, available_memory_bytes() // 4)
        self.paths = STEP_PATHS[self.kernels.name] if dtype == torch.bfloat16 else {}
        self.num_blocks = num_kv_blocks(cfg, cache, dtype)
        shape = (self.num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for attn in model.attention_layers():
            attn.k_cache = hugepages.empty(shape, dtype, prefault=True)
            attn.v_cache = hugepages.empty(shape, dtype, prefault=True)
            self.kv_caches.append((attn.k_cache, attn.v_cache))
        paths = ", ".join(f"{kind} steps: {' or '.join(p)}" for kind, p in self.paths.items())
        log.info("kernels: %s; %s", self.kernels, paths or "every step: model.forward")
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * kv_bytes_per_block(cfg, self.block_size, dtype) / 2**20,
        )

    def step_forward(self, ctx: ForwardContext) -> StepFn:
        """The one choice of path for a step: the model's declared fast path where `paths`
        names one for this kind of step and the model takes it, else its forward."""
        for path in self.paths.get(step_kind(ctx), ()):
            fast = self.model.decode_fast_path(path, ctx)
            if fast is not None:
                return fast
        return self.model

    @property
    def capacity_tokens(self) -> int:
        # block 0 is reserved as scratch (never allocated), as in TGI
        return (self.num_blocks - 1) * self.block_size

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        """Flatten the step: single-token rows first (batched decode attention), then chunks."""
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last_row: dict[int, int] = {}
        first_row: dict[str, int] = {}
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        seq_ends: list[int] = []
        for i in order:
            s = scheduled[i]
            req, start, end = s.request, s.start, s.end
            row0 = first_row[req.request_id] = len(ids)
            ids.extend(req.all_token_ids[start:end])
            pos.extend(range(start, end))
            slots.extend(self._slots(req.block_table, start, end))
            last_row[i] = len(ids) - 1
            seq_ends.append(end)
            nblocks = (end + self.block_size - 1) // self.block_size
            if s.num_new_tokens == 1:
                decode_tables.append(req.block_table[:nblocks])
                decode_lens.append(end)
            else:
                table = torch.tensor(req.block_table[:nblocks], dtype=torch.long)
                prefills.append(PrefillSeq(row0, s.num_new_tokens, end, table))
        num_decode = len(decode_lens)
        dec_tables = dec_lens = None
        max_ctx = max(decode_lens, default=0)
        if num_decode:
            width = max(len(t) for t in decode_tables)
            dec_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables])
            dec_lens = torch.tensor(decode_lens)
        ctx = ForwardContext(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            num_decode=num_decode,
            decode_block_tables=dec_tables,
            decode_context_lens=dec_lens,
            decode_max_context=max_ctx,
            prefills=prefills,
            seq_ends=seq_ends,
        )
        rows = [last_row[i] for i, s in enumerate(scheduled) if s.samples]
        return StepInputs(
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(pos, dtype=torch.long),
            ctx,
            torch.tensor(rows, dtype=torch.long),
            first_row,
        )

    @torch.inference_mode()
    def execute(
        self,
        out: SchedulerOutput,
        prompt_logprob_rows: list[ScheduledRequest] = (),
        greedy: bool = False,
        logprobs: bool = False,
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor | None], dict[str, list[float]]]:
        """Run one step.

        Returns logits [N, vocab] float32 for each scheduled request that samples (with
        `greedy`: instead the pair of their argmax over the vocabulary, [N] int64, as
        `argmax_rows` picks it, and with `logprobs` its log_softmax, [N] float32, else None),
        and for the requests in `prompt_logprob_rows` the logprob of each prompt token this
        chunk predicts.
        """
        step = self.prepare(out.scheduled)
        with forward_context(step.ctx):
            hidden = self.step_forward(step.ctx)(step.input_ids, step.positions)
        prompt_lps = {
            s.request.request_id: self._prompt_logprobs(s, hidden, step)
            for s in prompt_logprob_rows
        }
        if step.logits_rows.numel() == 0:
            return torch.empty(0, self.cfg.vocab_size), prompt_lps
        rows = hidden[step.logits_rows]
        if greedy:
            return self._greedy(rows, logprobs), prompt_lps
        return self.model.compute_logits(rows), prompt_lps

    def _greedy(
        self, rows: torch.Tensor, logprobs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where the model's output projection can keep only each row's argmax (and
        log_softmax there; `CausalLM.greedy`): same values, no [N, vocab] logits written and
        re-read (~0.5 ms of a 32-row step, ~1.5 ms with logprobs); else from the logits, as
        the sampler would."""
        vocab = self.cfg.vocab_size
        chosen = self.model.greedy(rows, vocab, logprobs)
        if chosen is not None:
            return chosen
        logits = self.model.compute_logits(rows)[:, :vocab]
        ids = argmax_rows(logits)
        return ids, chosen_logprobs(logits, ids) if logprobs else None

    def _prompt_logprobs(
        self, s: ScheduledRequest, hidden: torch.Tensor, step: StepInputs
    ) -> list[float]:
        """Row for position p predicts prompt token p+1 (the last prompt row predicts the
        first generated token, which is not part of the prefill)."""
        req = s.request
        end = min(s.end, req.num_prompt_tokens - 1)
        if end <= s.start:
            return []
        row0 = step.first_row[req.request_id]
        logits = self.model.compute_logits(hidden[row0 : row0 + end - s.start])
        targets = torch.tensor(req.prompt_token_ids[s.start + 1 : end + 1])
        lps = logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        return lps.tolist()
