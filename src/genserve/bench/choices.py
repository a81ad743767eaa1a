"""The names the bench command line accepts (import-light: `genserve launch` loads this too)."""

from __future__ import annotations

APIS = ("tgi", "openai-completions", "openai-chat")
FIXED_LENGTH_MODES = ("ignore_eos", "hf-generation-config", "none")
# in the order they run: the heaviest loads last, so a slow peer's backlog disturbs least
WORKLOADS = ("single", "shared-prefix", "sweep", "overload", "cold-start")
PEERS = (
    "genserve-bf16",
    "genserve-fp32",
    "llama.cpp-f16",
    "llama.cpp-q4_1",
    "transformers",
    "transformers-cb",
)
# llama.cpp build variants (genserve/bench/llamacpp.py): this CPU's native build, AVX-512
# without AMX, and AVX2 only (to set beside genserve's avx2-fma kernels)
LLAMACPP_ISAS = ("native", "avx512", "avx2")
