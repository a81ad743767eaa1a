"""The native fused bf16 decode layer against the PyTorch bf16 path, both measured against a
float32 run of the same weights: the kernel must be at least as close to float32 as PyTorch."""

from __future__ import annotations

import ctypes

import pytest
import torch

from genserve.config import CacheConfig
from genserve.engine.model_runner import ModelRunner
from genserve.engine.request import Request
from genserve.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from genserve.kernels import load_amx_linear, load_kernels
from genserve.layers.fused_decode import StackLayer
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


# 2 and 12 rows: with AMX, every layer of the step in one native call (forward_stack), else 2
# rows through the fused layer kernel (FusedDecode.MAX_ROWS) and 12 through forward_mixed
# (matmuls on prepacked weights with the native small ops and paged attention); layer: the
# fused layer kernel forced where AMX would take the step; mixed: forward_mixed with decode
# rows beside a prefill chunk
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
    stacked, layered = [], []  # steps through forward_stack, through the layer kernel
    fd = fused_runner.fused
    monkeypatch.setattr(
        fd, "forward_stack", lambda *a: stacked.append(1) or type(fd).forward_stack(fd, *a)
    )
    monkeypatch.setattr(fd, "forward", lambda *a: layered.append(1) or type(fd).forward(fd, *a))
    if layer:
        monkeypatch.setattr(fd, "_stack", lambda: None)
    assert fused_runner.fused is not None and fused_runner.fused.MAX_ROWS == 2
    assert (
        fused_runner.packed_bytes > 0 and fused_runner.model.model.layers[0].self_attn.attn.native
    )
    fused = _decode_logits(fused_runner, rows=rows, mixed=mixed)
    amx_stack = load_amx_linear() is not None and not layer
    assert len(stacked) == (6 if amx_stack and not mixed else 0)
    assert len(layered) == (6 if rows == 2 and not amx_stack else 0)
    torch_bf16 = _decode_logits(_runner(path, torch.bfloat16, native=False), rows=rows, mixed=mixed)
    exact = _decode_logits(_runner(path, torch.float32, native=False), rows=rows, mixed=mixed)
    err_fused = (fused - exact).abs().mean().item()
    err_torch = (torch_bf16 - exact).abs().mean().item()
    assert err_fused <= 1.5 * err_torch + 1e-3, (err_fused, err_torch)
    # and greedy choices agree with float32 wherever float32 has a clear winner
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.5
    assert torch.equal(fused.argmax(-1)[clear], exact.argmax(-1)[clear])


# genserve_decode_stack_bf16 is built in every kernel set: on panel_linear.c's linears (the
# CPUs without AMX) every layer of a batched decode step runs in one native call too
P = ctypes.c_void_p


def _panel_stack(fd, lib, keep):
    """FusedDecode._stack's tuple with every linear packed in panels (kept alive in `keep`)."""
    stack = []
    for layer, (_, attn) in zip(fd.model.model.layers, fd.layers, strict=True):
        ptrs = []
        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                  layer.mlp.down_proj):  # fmt: skip
            w = m.weight.detach().to(torch.bfloat16).contiguous()
            n, k = w.shape
            p = torch.empty(lib.genserve_panel_packed_size(n, k), dtype=torch.bfloat16)
            lib.genserve_panel_pack_bf16(w.data_ptr(), p.data_ptr(), n, k)
            keep.append(p)
            ptrs.append(p.data_ptr())
        stack.append(StackLayer(*ptrs, attn.k_cache.data_ptr(), attn.v_cache.data_ptr()))
    n = len(stack)
    glu = ctypes.cast(lib.genserve_panel_glu_bf16, P)
    if fd.cfg.intermediate_size % 16:
        glu = None
    weights = (type(fd.layers[0][0]) * n)(*(w for w, _ in fd.layers))
    return ctypes.cast(lib.genserve_panel_linear_bf16, P), glu, weights, (StackLayer * n)(*stack)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_stack_on_panel_linears(use_kernel_set, tiny_model_dir, arch, monkeypatch):
    path = tiny_model_dir(arch)
    runner = _runner(path, torch.bfloat16, native=True)
    fd = runner.fused
    assert fd is not None
    lib = load_kernels(use_kernel_set)
    keep: list[torch.Tensor] = []
    args = _panel_stack(fd, lib, keep)
    stacked = []
    monkeypatch.setattr(fd, "_stack", lambda: args)
    monkeypatch.setattr(
        fd, "forward_stack", lambda *a: stacked.append(1) or type(fd).forward_stack(fd, *a)
    )
    ours = _decode_logits(runner, rows=12)
    assert len(stacked) == 6
    torch_bf16 = _decode_logits(_runner(path, torch.bfloat16, native=False), rows=12)
    exact = _decode_logits(_runner(path, torch.float32, native=False), rows=12)
    err = (ours - exact).abs().mean().item()
    err_torch = (torch_bf16 - exact).abs().mean().item()
    assert err <= 1.5 * err_torch + 1e-3, (err, err_torch)
