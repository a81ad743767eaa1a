"""The full side-by-side comparison in one command (see bench/README.md).

    python bench/peers.py                       # build what is missing, then run everything
    python bench/peers.py --build-only          # just llama-server + the F16 GGUF (~15 min)
    python bench/peers.py --llamacpp-isa avx2   # llama.cpp for AVX2 only (default: this CPU's)
    python bench/peers.py --peers genserve-bf16,llama.cpp-q4_1 --workloads single,sweep

Builds llama.cpp's `llama-server` from the `llama-cpp-python==0.3.36` sdist once per variant
(nice -n 19, -j2; for this CPU, without AMX on AMX CPUs, unless --llamacpp-isa says otherwise)
and converts the F16 GGUF, then runs `genserve bench --compare` over every peer and writes
`<out>/compare.json`, `<out>/compare.png`, `<out>/compare.md` (the tables) and the server logs.
Heavy: about 45 minutes on 2 cores; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from genserve.bench import cli, llamacpp
from genserve.bench.choices import LLAMACPP_ISAS, PEERS
from genserve.kernels.cpu import cpu_flags
from genserve.models.default_model import default_model_dir

DEFAULT_WORKLOADS = "single,sweep,shared-prefix,cold-start,overload"


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="bench/results", help="directory for JSON, PNG, tables, logs")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    p.add_argument("--duration", type=float, default=60.0, help="time limit per run, s")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every server")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--build-only", action="store_true")
    p.add_argument(
        "--llamacpp-isa", choices=LLAMACPP_ISAS, default=llamacpp.default_isa(cpu_flags())
    )
    args = p.parse_args()

    cache = llamacpp.bench_cache(Path(args.cache_dir) if args.cache_dir else None)
    binary = llamacpp.build_llama_server(cache, args.llamacpp_isa)
    gguf = llamacpp.f16_gguf(cache, default_model_dir())
    print(f"llama-server: {binary}\nF16 GGUF: {gguf}\nQ4_1 GGUF: {llamacpp.q4_1_gguf()}")
    if args.build_only:
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    argv = ["--compare", args.peers, "--workload", args.workloads, "--cache-dir", str(cache)]
    argv += ["--llamacpp-isa", args.llamacpp_isa]
    argv += ["--duration", str(args.duration), "--threads", str(args.threads)]
    argv += ["--json", str(out / "compare.json")]
    argv += ["--plot", str(out / "compare.png"), "--log-dir", str(out / "logs")]
    with open(out / "compare.md", "w") as md, contextlib.redirect_stdout(_Tee(sys.stdout, md)):
        return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
