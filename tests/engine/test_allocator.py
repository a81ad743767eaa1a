"""A prefill step's activations reuse the memory of the step before: after
`retain_step_buffers` (applied by the model runner) the step takes no page faults, where glibc's
defaults give back and fault in thousands of pages every step (SmolLM2-135M, 2,048 tokens:
5,000-9,000 faults per step without it, under 20 with it). Measured in a fresh process: the
test process's other engines and threads fault pages of their own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from genserve import allocator

STEPS = """
import json, resource, sys
from genserve import allocator, hugepages
from genserve.config import CacheConfig
from genserve.engine.llm_engine import LLMEngine
from genserve.engine.request import Request
from genserve.sampling.params import SamplingParams, StoppingParams

if sys.argv[2] == "off":  # glibc's defaults: thousands of faults every step
    allocator.retain_step_buffers = lambda: False
engine = LLMEngine.from_model(
    sys.argv[1], dtype="bfloat16", cache_config=CacheConfig(block_size=16, num_blocks=512)
)
hugepages.wait_prefaulted()
faults = []
for step in range(6):
    for i in range(16):  # 16 x 128 prompt tokens: one 2,048-token prefill step
        prompt = [(step * 7 + i * 131 + j * 17) % 40000 + 100 for j in range(128)]
        engine.add_request(Request(f"{step}-{i}", prompt, SamplingParams(logprobs=False),
                                   StoppingParams(max_new_tokens=1, ignore_eos=True)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    while engine.has_unfinished():
        engine.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(model_dir, setting: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, str(model_dir), setting],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prefill_steps_reuse_their_buffers(smollm2_dir):
    if not allocator.retain_step_buffers():
        pytest.skip("malloc is not glibc's")
    faults = _faults(smollm2_dir, "on")
    # the first step grows the heap once; of the next five, the median (a step may still meet
    # an odd allocation of its own; without the settings it is thousands)
    assert sorted(faults[1:])[2] < 500, faults
