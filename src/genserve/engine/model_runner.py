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
from genserve.kernels import load_kernels
from genserve.kernels.cpu import native_enabled
from genserve.layers.fused_decode import FusedDecode
from genserve.layers.packed_linear import pack_linear_weights, packing_supported
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
        model: torch.nn.Module,
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
        # before sizing the KV cache from free memory: the packed copy takes its share first
        self.packed_bytes = 0
        if native_kernels and native_enabled() and packing_supported(dtype):
            self.packed_bytes = pack_linear_weights(model, available_memory_bytes() // 4)
        self.num_blocks = num_kv_blocks(cfg, cache, dtype)
        shape = (self.num_blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in model.model.layers:
            k = hugepages.empty(shape, dtype, prefault=True)
            v = hugepages.empty(shape, dtype, prefault=True)
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = k, v
            self.kv_caches.append((k, v))
        # bf16: with AMX, pure-decode steps run all layers in one native call
        # (`FusedDecode.forward_stack`); without, pure-decode steps of few rows run through the
        # fused native layer kernel; every other step through packed matmuls with native small
        # ops and paged attention (`FusedDecode.forward_mixed`). Where FusedDecode declines the
        # model (dynamic rope), the PyTorch model runs, its attention modules still using the
        # native kernel for bf16 decode rows (no K/V gather)
        self.fused = FusedDecode.create(model, dtype) if native_kernels else None
        lib = load_kernels() if native_kernels and dtype == torch.bfloat16 else None
        for layer in model.model.layers:
            layer.self_attn.attn.native = lib
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * kv_bytes_per_block(cfg, self.block_size, dtype) / 2**20,
        )

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
        fused = self.fused if self.fused is not None and self.fused.supports(step.ctx) else None
        with forward_context(step.ctx):
            if fused is not None:
                hidden = fused.forward(step.input_ids, step.positions, step.ctx)
            elif self.fused is not None:
                hidden = self.fused.forward_mixed(step.input_ids, step.positions, step.ctx)
            else:
                hidden = self.model(step.input_ids, step.positions)
        prompt_lps = {
            s.request.request_id: self._prompt_logprobs(s, hidden, step)
            for s in prompt_logprob_rows
        }
        if step.logits_rows.numel() == 0:
            return torch.empty(0, self.cfg.vocab_size), prompt_lps
        rows = hidden[step.logits_rows]
        if greedy:
            return self._greedy(rows, fused, logprobs), prompt_lps
        if fused is not None:
            return fused.logits(rows), prompt_lps
        return self.model.compute_logits(rows), prompt_lps

    def _greedy(
        self, rows: torch.Tensor, fused: FusedDecode | None, logprobs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where `compute_logits` would use the AMX-packed output projection, the projection
        keeps only each row's argmax (and log_softmax there): same values, no [N, vocab]
        logits written and re-read (~0.5 ms of a 32-row step, ~1.5 ms with logprobs); else
        from the logits, as the sampler would."""
        vocab = self.cfg.vocab_size
        head = self.model.packed_head(rows.shape[0]) if fused is None else None
        chosen = head.argmax(rows, vocab, logprobs) if head is not None else None
        if chosen is not None:
            return chosen
        logits = fused.logits(rows) if fused is not None else self.model.compute_logits(rows)
        logits = logits[:, :vocab]
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
