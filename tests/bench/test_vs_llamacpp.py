"""The pure parts of the llama.cpp comparison: build variants, llama-bench's JSON, the CPU line,
the kernel-set environment and the tables. No llama.cpp build and no timing here."""

from __future__ import annotations

import json
import signal

import pytest

from genserve.bench import llamabench, llamacpp, machine
from genserve.bench.report import machine_info
from genserve.bench.sidebyside import best_of, numbers_table, ratio_table

SPR = frozenset("avx2 fma f16c bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16 amx_tile".split())
EPYC_ZEN2 = frozenset("avx2 fma f16c bmi2 sse4_2".split())


def test_variants_are_checked_against_the_cpu() -> None:
    assert llamacpp.parse_variants("native, avx2,native", SPR) == ["native", "avx2"]
    assert llamacpp.parse_variants("avx2", EPYC_ZEN2) == ["avx2"]
    with pytest.raises(ValueError, match="needs avx512f"):
        llamacpp.parse_variants("avx512", EPYC_ZEN2)
    with pytest.raises(ValueError, match="unknown llama.cpp variant 'sse'"):
        llamacpp.parse_variants("sse", SPR)


def test_default_variant_avoids_the_amx_crash() -> None:
    assert llamacpp.default_isa(SPR | {"amx_int8"}) == "avx512"
    assert llamacpp.default_isa(EPYC_ZEN2) == "native"


def test_variant_flags() -> None:
    native, avx2, avx512 = (llamacpp.cmake_flags(v) for v in ("native", "avx2", "avx512"))
    assert "-DGGML_NATIVE=ON" in native and "-DGGML_AVX512=ON" not in native
    assert "-DGGML_NATIVE=OFF" in avx2 and "-DGGML_AVX2=ON" in avx2
    assert not any("AVX512" in f or "AMX" in f for f in avx2)
    assert "-DGGML_AVX512_BF16=ON" in avx512 and "-DGGML_AMX_INT8=OFF" in avx512
    for flags in (native, avx2, avx512):  # nothing fetched at build time
        assert "-DLLAMA_CURL=OFF" in flags and "-DLLAMA_USE_PREBUILT_UI=OFF" in flags


def test_builds_are_cached_per_variant(tmp_path) -> None:
    bench = llamacpp.binary_path(tmp_path, "avx2", "llama-bench")
    assert bench == tmp_path / "llama-build-avx2" / "bin" / "llama-bench"
    assert llamacpp.llama_server_path(tmp_path).parent.parent.name == "llama-build-native"
    bench.parent.mkdir(parents=True)
    bench.touch()
    assert llamacpp.build_llama(tmp_path, "avx2", ("llama-bench",)) == bench.parent  # no build


def test_vendored_commit_from_the_changelog() -> None:
    log = "## [0.3.37]\n\n- update llama.cpp to ggml-org/llama.cpp@1111111\n\n"
    log += (
        "## [0.3.36]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n\n## [0.3.35]\n"
    )
    assert llamacpp.llama_cpp_commit(log, "0.3.36") == "0c1e57098"
    assert llamacpp.llama_cpp_commit(log, "0.3.1") is None


def _test(n_prompt: int, n_gen: int, samples: list[float]) -> dict:
    return {"build_commit": "abc1234", "build_number": 7000, "cpu_info": "Xeon",
            "model_type": "llama ?B BF16", "n_threads": 2, "n_prompt": n_prompt, "n_gen": n_gen,
            "avg_ts": sum(samples) / len(samples), "samples_ts": samples}  # fmt: skip


def test_llama_bench_json_is_parsed() -> None:
    out = "some log line\n" + json.dumps(
        [_test(512, 0, [900, 1000, 950]), _test(0, 128, [70, 60, 65])]
    )
    got = llamabench.parse(out)
    assert got["prefill_tok_s"] == 950 and got["decode_tok_s"] == 65
    assert got["build"] == "7000 (abc1234)" and got["threads"] == 2
    cmd = llamabench.command("llama-bench", "m.gguf", threads=2, reps=3)
    assert cmd[cmd.index("-p") + 1] == "512" and cmd[cmd.index("-n") + 1] == "128"
    assert cmd[-2:] == ["-o", "json"] and cmd[cmd.index("-t") + 1] == "2"


def test_a_crash_is_named() -> None:
    assert llamabench.failure(-signal.SIGSEGV, "load\nboom\n") == "crashed (SIGSEGV): boom"
    assert llamabench.failure(1, "") == "exit 1"


def test_cpu_line_and_flags() -> None:
    assert machine.relevant_flags(["sse2", "amx_bf16", "avx2", "fma"]) == [
        "avx2",
        "fma",
        "amx_bf16",
    ]
    info = {"cpu_model": "Some CPU", "cpu_flags": ["avx2", "fma"], "genserve_kernels": "avx2-fma"}
    assert machine.cpu_line(info) == "CPU Some CPU; flags avx2 fma; genserve kernels avx2-fma"
    info["torch_isa"] = {"ATEN_CPU_CAPABILITY": "avx2"}
    assert machine.cpu_line(info).endswith("; PyTorch limited to ATEN_CPU_CAPABILITY=avx2")
    meta = machine_info()
    assert {"cpu_model", "cpu_flags", "genserve_kernels"} <= set(meta)


def test_kernel_set_environment() -> None:
    env = machine.kernels_env("avx2-fma")
    assert env == {"GENSERVE_KERNELS": "avx2-fma", "ATEN_CPU_CAPABILITY": "avx2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}  # fmt: skip
    assert machine.kernels_env("amx") == {"GENSERVE_KERNELS": "amx"}
    assert machine.default_kernel_sets(["amx", "avx512-bf16", "avx2-fma"]) == ["amx", "avx2-fma"]
    assert machine.default_kernel_sets(["avx2-fma"]) == ["avx2-fma"]
    assert machine.default_kernel_sets([]) == ["torch"]


def test_side_by_side_tables() -> None:
    rows = [
        dict(engine="genserve", variant="amx", weights="bfloat16", decode_tok_s=90.0,
             prefill_tok_s=3000.0, note="", load_1m=1.234),
        dict(engine="transformers", variant="PyTorch", weights="float32", decode_tok_s=30.0,
             prefill_tok_s=1500.0),
        dict(engine="llama.cpp", variant="native", weights="BF16 GGUF", decode_tok_s=60.0,
             prefill_tok_s=1000.0),
        dict(engine="llama.cpp", variant="native", weights="Q4_1 GGUF", error="crashed (SIGSEGV)"),
    ]  # fmt: skip
    numbers = numbers_table(rows).splitlines()
    assert numbers[0].startswith("| engine | kernels / build | weights | decode tok/s")
    assert "| genserve | amx | bfloat16 | 90.0 | 3000 | 1.2 |  |" in numbers
    assert "| llama.cpp | native | Q4_1 GGUF | - | - | - | crashed (SIGSEGV) |" in numbers
    ratios = ratio_table(rows).splitlines()
    assert ratios[0] == (
        "| genserve / (decode / prefill) | transformers PyTorch float32 | "
        "llama.cpp native BF16 GGUF |"
    )
    assert ratios[2] == "| genserve amx bfloat16 | 3.00x / 2.00x | 1.50x / 3.00x |"
    assert ratio_table(rows[:1]) == ""


def test_best_of_rounds() -> None:
    a = [
        dict(
            engine="genserve",
            variant="amx",
            weights="bf16",
            decode_tok_s=80.0,
            prefill_tok_s=900.0,
            load_1m=3.0,
        ),
        dict(engine="llama.cpp", variant="native", weights="Q4_1 GGUF", error="crashed"),
    ]
    b = [dict(engine="genserve", variant="amx", weights="bf16", decode_tok_s=90.0,
              prefill_tok_s=800.0, load_1m=1.0),
         dict(engine="llama.cpp", variant="native", weights="Q4_1 GGUF", error="crashed")]  # fmt: skip
    ours, crashed = best_of([a, b])
    assert (ours["decode_tok_s"], ours["prefill_tok_s"], ours["rounds"]) == (90.0, 900.0, 2)
    assert crashed["error"] == "crashed" and crashed["rounds"] == 0
    assert (
        best_of([b[1:], a[:1] + [dict(b[1], error=None, decode_tok_s=5.0)]])[0].get("error") is None
    )
