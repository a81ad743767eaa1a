"""genserve: a text-generation inference server speaking TGI's and OpenAI's APIs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "LLM"]


def __getattr__(name: str):
    # Lazy: importing genserve must not import torch (the CLI's --help stays fast).
    if name == "LLM":
        from genserve.llm import LLM

        return LLM
    raise AttributeError(name)
