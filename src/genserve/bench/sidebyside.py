"""genserve beside llama.cpp and `transformers`, one model step at a time: the rows that
bench/vs_llamacpp.py collects, as two Markdown tables (the numbers, then genserve's ratios).

A row: {"engine", "variant" (genserve's kernel set, llama.cpp's build variant, or "PyTorch"),
"weights", "decode_tok_s", "prefill_tok_s"}, optionally "note" or "error" (e.g. a crash)."""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]


def label(row: Row) -> str:
    return f"{row['engine']} {row['variant']} {row['weights']}"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _md(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def best_of(rounds: list[list[Row]]) -> list[Row]:
    """Rows of several rounds merged, each number its best (highest) over the rounds: on a
    shared machine neighbours only ever slow a run down. A row that failed in every round keeps
    its error; the rows keep the first round's order."""
    merged: dict[str, Row] = {}
    for rows in rounds:
        for r in rows:
            best = merged.setdefault(label(r), dict(r, rounds=0))
            best["rounds"] += 0 if r.get("error") else 1
            for key in ("decode_tok_s", "prefill_tok_s"):
                if r.get(key) is not None and r[key] > (best.get(key) or 0):
                    best[key] = r[key]
                    best["load_1m"] = r.get("load_1m")
            if not r.get("error"):
                best.pop("error", None)
    return list(merged.values())


def numbers_table(rows: list[Row]) -> str:
    header = ["engine", "kernels / build", "weights", "decode tok/s", "prefill 512 tok/s"]
    header += ["load 1m", "notes"]  # the machine's load after the row: neighbours skew numbers
    lines = []
    for r in rows:
        note = r.get("error") or r.get("note") or ""
        load = f"{r['load_1m']:.1f}" if r.get("load_1m") is not None else "-"
        cells = [r["engine"], r["variant"], r["weights"]]
        cells += [_num(r.get("decode_tok_s")), _num(r.get("prefill_tok_s")), load, note]
        lines.append(cells)
    return _md(header, lines)


def _ratio(ours: Row, ref: Row) -> str:
    parts = []
    for key in ("decode_tok_s", "prefill_tok_s"):
        a, b = ours.get(key), ref.get(key)
        parts.append(f"{a / b:.2f}x" if a and b else "-")
    return " / ".join(parts)


def ratio_table(rows: list[Row]) -> str:
    """Each genserve row over each reference row (every llama.cpp row that ran, and
    `transformers`), as "decode ratio / prefill ratio"."""
    ours = [r for r in rows if r["engine"] == "genserve" and not r.get("error")]
    refs = [r for r in rows if r["engine"] != "genserve" and not r.get("error")]
    if not ours or not refs:
        return ""
    header = ["genserve / (decode / prefill)", *(label(r) for r in refs)]
    return _md(header, [[label(o), *(_ratio(o, r) for r in refs)] for o in ours])
