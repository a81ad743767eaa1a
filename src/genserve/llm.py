"""Offline batched generation on the same engine the server uses.

llm = LLM()                                   # the built-in SmolLM2-135M-Instruct
outs = llm.generate(["Hello", "1, 2, 3,"], max_new_tokens=16)
outs[0].text, outs[0].token_ids, outs[0].finish_reason
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from genserve.config import CacheConfig, SchedulerConfig
from genserve.engine.llm_engine import LLMEngine
from genserve.engine.request import FinishReason, Request
from genserve.sampling.params import SamplingParams, StoppingParams

_ids = itertools.count()


@dataclass(slots=True)
class GenerationOutput:
    prompt: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    error: str | None = None


class LLM:
    def __init__(
        self,
        model_id: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        kv_cache_memory: int | None = None,
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        if cache_config is None and kv_cache_memory is not None:
            cache_config = CacheConfig(memory_bytes=kv_cache_memory)
        self.engine = LLMEngine.from_model(
            model_id, revision=revision, dtype=dtype, cache_config=cache_config,
            scheduler_config=scheduler_config,
        )  # fmt: skip
        self.tokenizer = self.engine.tokenizer

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        from genserve.tokenization.chat_template import ChatTemplate

        template = ChatTemplate.from_tokenizer(self.tokenizer)
        return template.render(messages, add_generation_prompt=True)

    def generate(
        self,
        prompts: list[str] | str,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        add_special_tokens: bool = True,
    ) -> list[GenerationOutput]:
        """All prompts are submitted at once, so they run batched."""
        if isinstance(prompts, str):
            prompts = [prompts]
        outputs: dict[str, GenerationOutput] = {}
        for prompt in prompts:
            rid = f"llm-{next(_ids)}"
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            sampling = SamplingParams(
                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, seed=seed, logprobs=False,
            )  # fmt: skip
            stopping = StoppingParams(max_new_tokens, list(stop or []), ignore_eos)
            self.engine.add_request(Request(rid, ids, sampling, stopping))
            outputs[rid] = GenerationOutput(prompt, "", num_prompt_tokens=len(ids))
        pending = set(outputs)
        while pending:
            for event in self.engine.step():
                out = outputs[event.request_id]
                if event.error is not None:
                    out.error = event.error
                else:
                    out.token_ids.append(event.token_id)
                if event.finished:
                    out.finish_reason = event.finish_reason
                    out.text = event.generated_text or ""
                    pending.discard(event.request_id)
        return list(outputs.values())
