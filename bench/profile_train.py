"""Where a training step's time goes: `phi2sum.train.train` under torch.profiler, a few steady steps.

    python3 bench/profile_train.py --config configs/smollm2.yaml --out $OUT/prof-full \
        --set model.name=/tmp/m/smollm2.gguf --set data.source=.gpu/data --set lora.enabled=false ...

Runs the real training loop (not a copy of it) and records --active steady steps after --skip + 1 (never the
last step, which also evaluates and saves). The profiler's step marker rides on `lr_at`, which the loop calls
once per optimizer step. Writes summary.json (per step: wall time, GPU-busy time with overlapping kernels
counted once, and the host operations that took longest), table.txt (torch's operator table) and a Chrome
trace, trace.json.gz. `python3 bench/profile_train.py --analyze trace.json.gz [--drop-last]` re-reads a trace.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def analyze(trace: dict, top: int = 15, drop_last: bool = False) -> dict:
    """Per recorded step: wall time (the profiler's step annotation), GPU-busy time (kernels and copies merged
    into intervals, so overlapping work counts once) and the host operations that took the most time."""
    events = trace["traceEvents"]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith("ProfilerStep")),
                   key=lambda e: e["ts"])
    steps = steps[:-1] if drop_last else steps
    if not steps:
        raise SystemExit("no recorded steps in the trace (raise --active, or drop --drop-last)")
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    rows = []
    for st in steps:
        a, b = st["ts"], st["ts"] + st["dur"]
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in device if a <= e["ts"] < b)
        busy, end = 0.0, -1.0
        for x, y in spans:
            if y > end:
                busy += y - max(x, end)
                end = y
        rows.append({"step": st["name"], "wall_ms": st["dur"] / 1e3, "gpu_busy_ms": busy / 1e3})
    # Host operations, outermost call only (an op that calls itself, as eager SDPA does, would count twice):
    # totals per name, and single calls with their rank among same-named calls of their step (0 = first; in the
    # backward pass the first call is the last layer's). A cost paid once per step, such as a plan built for a
    # new shape, shows up at rank 0.
    host: dict[str, float] = {}
    calls: dict[str, int] = {}
    single, first_calls = [], {}
    for k, st in enumerate(steps):
        a, b = st["ts"], st["ts"] + st["dur"]
        rank: dict[str, int] = {}
        open_until: dict[str, float] = {}
        for e in sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime") and a <= e["ts"] < b),
                        key=lambda e: e["ts"]):
            name = e["name"]
            if e["ts"] < open_until.get(name, -1):
                continue  # inside a call of the same name: counted by the outer one
            open_until[name] = e["ts"] + e["dur"]
            host[name] = host.get(name, 0.0) + e["dur"]
            calls[name] = calls.get(name, 0) + 1
            if e["cat"] != "cpu_op":
                continue
            r = rank.get(name, 0)
            single.append({"op": name[:100], "ms": round(e["dur"] / 1e3, 2), "step": k, "rank": r})
            if r == 0:
                first_calls.setdefault(name[:100], []).append(round(e["dur"] / 1e3, 2))
            rank[name] = r + 1
    n = len(steps)
    wall = sum(r["wall_ms"] for r in rows)
    busy = sum(r["gpu_busy_ms"] for r in rows)
    return {"steps": rows, "wall_ms_per_step": wall / n, "gpu_busy_ms_per_step": busy / n,
            "gpu_busy_share": busy / wall,
            "longest_host_calls": sorted(single, key=lambda x: -x["ms"])[:top],
            # Each step's first call of the ops whose first calls took longest (ms, one value per step).
            "first_call_ms": dict(sorted(first_calls.items(), key=lambda kv: -sum(kv[1]))[:top]),
            # Inclusive times: an operation's time contains the operations it called, so do not add rows up.
            "host_ms_per_step": [{"op": k[:100], "ms": round(v / 1e3 / n, 1), "calls": round(calls[k] / n, 1)}
                                 for k, v in sorted(host.items(), key=lambda kv: -kv[1])[:top]]}


def main() -> None:
    from phi2sum import train as train_mod
    from phi2sum.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--skip", type=int, default=30, help="steps before recording (compile, warm-up)")
    ap.add_argument("--active", type=int, default=5)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    run = a.out / "run"
    steps = a.skip + a.active + 3  # the last step also evaluates and saves: keep it out of the recording
    cfg = load_config(a.config, a.set + [f"train.output_dir={run}", f"train.max_steps={steps}", "train.eval_every=0",
                                         "train.save_every=100000", "train.early_stopping_patience=0",
                                         "train.keep_best=false", "train.log_every=1"])
    sched = torch.profiler.schedule(wait=a.skip, warmup=1, active=a.active, repeat=1)
    seen = [0]
    widths: list[list[int]] = [[]]  # padded widths of the micro-batches each training step collated
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                schedule=sched) as prof:
        lr_at, collate = train_mod.lr_at, train_mod.collate

        def stepping(*args, **kw):
            if seen[0]:
                prof.step()
            seen[0] += 1
            widths.append([])
            return lr_at(*args, **kw)

        def recording(*args, **kw):
            batch = collate(*args, **kw)
            widths[-1].append(int(batch["input_ids"].shape[1]))
            return batch

        train_mod.lr_at, train_mod.collate = stepping, recording
        try:
            result = train_mod.train(cfg, overwrite=True)
        finally:
            train_mod.lr_at, train_mod.collate = lr_at, collate
    trace = a.out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(a.out / "trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    found = analyze(json.load(open(trace)))
    trace.unlink()
    # lr_at runs after a step's backward, so ProfilerStep#k spans training step k+1's optimizer update and step
    # k+2's collation, forward and backward: its widths are widths[k+1] (widths[0] = step 1). "new" = a width no
    # earlier training batch had (validation batches excluded), which is when a per-shape plan would be built.
    seen_widths: set[int] = set()
    new_width = []
    for ws in widths:
        new_width.append(any(w not in seen_widths for w in ws))
        seen_widths.update(ws)
    for row in found["steps"]:
        k = int(row["step"].split("#")[1]) + 1
        row["train_step"], row["widths"], row["new_width"] = k + 1, widths[k], new_width[k]
    summary = {"config": a.config, "overrides": a.set,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "whole_run_tokens_per_second": result.tokens_per_second,
               "peak_memory_gib": result.peak_memory_gib} | found
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    averages = prof.key_averages()
    try:
        table = averages.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    except (KeyError, AttributeError, ValueError):  # newer torch names it "device"
        table = averages.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    (a.out / "table.txt").write_text(table)
    print(json.dumps(summary))
    print(table)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--analyze":
        print(json.dumps(analyze(json.load(gzip.open(sys.argv[2])), drop_last="--drop-last" in sys.argv), indent=2))
    else:
        main()
