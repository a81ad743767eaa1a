"""The names the bench command line accepts (import-light: `genserve launch` loads this too)."""

from __future__ import annotations

APIS = ("tgi", "openai-completions", "openai-chat")
FIXED_LENGTH_MODES = ("ignore_eos", "hf-generation-config", "none")
WORKLOADS = ("single", "sweep", "shared-prefix", "overload", "cold-start")
PEERS = ("genserve-bf16", "genserve-fp32", "llama.cpp-f16", "llama.cpp-q4_1", "transformers")
