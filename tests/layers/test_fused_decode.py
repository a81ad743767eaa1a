"""The native fused bf16 decode layer against the PyTorch bf16 path, both measured against a
float32 run of the same weights: the kernel must be at least as close to float32 as PyTorch."""

from __future__ import annotations

import pytest
import torch

from genserve.config import CacheConfig
from genserve.engine.model_runner import ModelRunner
from genserve.engine.request import Request
from genserve.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from genserve.models.loader import load_config, load_model


def _runner(path, dtype, native):
    cfg = load_config(path)
    model = load_model(path, dtype, cfg)
    return ModelRunner(model, cfg, CacheConfig(block_size=4, num_blocks=512), dtype, native)


def _decode_logits(runner, steps=6, rows=3, mixed=False):
    """Prefill `rows` prompts, then decode `steps` steps feeding fixed tokens; logits per step.
    `mixed`: every step also prefills a new 5-token prompt (decode rows beside a chunk)."""
    reqs = [
        Request(str(i), [(37 * i + 11 * j) % 1000 + 5 for j in range(6 + 9 * (i % 4))])
        for i in range(rows)
    ]
    nxt = 1
    for r in reqs:
        r.block_table = list(range(nxt, nxt + 20))
        nxt += 20
    runner.execute(SchedulerOutput([ScheduledRequest(r, r.num_tokens) for r in reqs]))
    out = []
    for step in range(steps):
        for r in reqs:
            r.num_computed_tokens = r.num_tokens
            r.append_output_token(100 + step)
        scheduled = [ScheduledRequest(r, 1) for r in reqs]
        if mixed:
            new = Request(f"m{step}", [(13 * step + 7 * j) % 1000 + 5 for j in range(5)])
            new.block_table = list(range(nxt, nxt + 2))
            nxt += 2
            scheduled.append(ScheduledRequest(new, 5))
        logits, _ = runner.execute(SchedulerOutput(scheduled))
        out.append(logits)
    return torch.stack(out)


# 2 and 12 rows: with AMX, every layer of the step in one native call (the `stack` path), else
# 2 rows through the fused layer kernel (the `layer` path, FusedDecode.MAX_ROWS) and 12 through
# the model's forward on the native kernels; layer: the layer path forced where AMX would take
# the step; mixed: decode rows beside a prefill chunk (the model's forward)
@pytest.mark.parametrize(
    ("rows", "mixed", "layer"),
    [(2, False, False), (2, False, True), (12, False, False), (6, True, False)],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_fused_decode_matches_torch_bf16(
    use_kernel_set, tiny_model_dir, arch, rows, mixed, layer, monkeypatch
):
    path = tiny_model_dir(arch)
    fused_runner = _runner(path, torch.bfloat16, native=True)
    stacked, layered = [], []  # steps through the stack, through the layer kernel
    fd = fused_runner.model._fused
    monkeypatch.setattr(
        fd,
        "forward_stack",
        lambda *a, **k: stacked.append(1) or type(fd).forward_stack(fd, *a, **k),
    )
    monkeypatch.setattr(
        fd, "forward_layers",
        lambda *a, **k: layered.append(1) or type(fd).forward_layers(fd, *a, **k),
    )  # fmt: skip
    if layer:
        monkeypatch.setattr(fused_runner, "paths", {"decode": ("layer",)})
    decode_path = fused_runner.paths["decode"][0]
    assert fd is not None and fd.MAX_ROWS == 2
    assert fused_runner.model.attention_layers()[0].lib is not None
    assert fused_runner.packed_bytes > 0  # every native set packs its linears
    fused = _decode_logits(fused_runner, rows=rows, mixed=mixed)
    assert len(stacked) == (6 if decode_path == "stack" and not mixed else 0)
    assert len(layered) == (6 if decode_path == "layer" and rows == 2 and not mixed else 0)
    torch_bf16 = _decode_logits(_runner(path, torch.bfloat16, native=False), rows=rows, mixed=mixed)
    exact = _decode_logits(_runner(path, torch.float32, native=False), rows=rows, mixed=mixed)
    err_fused = (fused - exact).abs().mean().item()
    err_torch = (torch_bf16 - exact).abs().mean().item()
    assert err_fused <= 1.5 * err_torch + 1e-3, (err_fused, err_torch)
    # and greedy choices agree with float32 wherever float32 has a clear winner
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.5
    assert torch.equal(fused.argmax(-1)[clear], exact.argmax(-1)[clear])
