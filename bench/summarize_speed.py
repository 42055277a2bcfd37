"""How fast does `phi2sum summarize` work through a large corpus: dialogues per second for a trained run, greedy and
with the run's own (minimum-Bayes-risk) decoding, streaming to --out as a user runs it?

    python3 bench/summarize_speed.py --data /path/to/dialogsum --run RUN [--greedy 10000] [--mbr 1000]

One CUDA card, one process, through the function `phi2sum summarize CORPUS --adapter RUN --out OUT` calls
(phi2sum.summarize.run). The corpus is the first N dialogues of DialogSum's train split written as JSON lines with
their ids, as a user's corpus file; each case starts from an empty --out. `seconds` is the whole call: model
loading, every batch, and the write and fsync of each batch's summaries. The greedy case takes the settings
configs/smollm2.yaml names for summarizing many dialogues (greedy, batch_size 512); the MBR case the run's own
generation settings. Each output is then checked to hold every id exactly once. Writes
bench/results/summarize_speed/<card>-<date>.json and .md; the summaries go to
bench/results/summarize_speed/raw/ (not in git).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (command_line, decoding, environment, free_memory, raw_dir, require_cuda, rows, run_case,  # noqa: E402
                    table, write_result)

GREEDY = ["generation.do_sample=false", "generation.mbr_candidates=0", "generation.mbr_evidence=0",
          "generation.batch_size=512"]


def corpus(train: list[dict], n: int, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": r["id"], "dialogue": r["dialogue"]}) + "\n" for r in train[:n]))
    return path


def timed_summarize(name: str, cfg, run: Path, inputs: Path, out: Path) -> dict:
    import torch

    from phi2sum.summarize import run as summarize

    out.unlink(missing_ok=True)
    free_memory()
    started = time.perf_counter()
    results, problems = summarize(cfg, str(run), [str(inputs)], out)
    seconds = time.perf_counter() - started
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    wanted = [json.loads(line)["id"] for line in inputs.read_text().splitlines()]
    g = cfg.generation
    return {"name": name, "model": cfg.model.name, "dialogues": len(wanted), "written": len(ids),
            "every_id_once": sorted(ids) == sorted(wanted), "failed_inputs": len(problems),
            "decoding": decoding(g),
            "batch_size": g.batch_size, "batch_tokens": g.batch_tokens, "max_new_tokens": g.max_new_tokens,
            "seconds": seconds, "dialogues_per_s": len(wanted) / seconds,
            "run_on_share": sum(r["run_on"] for r in results) / max(len(results), 1),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="DialogSum folder: train/validation/test.jsonl(.gz)")
    ap.add_argument("--run", type=Path, required=True, help="run folder (phi2sum train), e.g. one of configs/smollm2.yaml")
    ap.add_argument("--greedy", type=int, default=10000, help="train dialogues summarized greedily (0: skip)")
    ap.add_argument("--mbr", type=int, default=1000, help="train dialogues summarized with the run's decoding (0: skip)")
    ap.add_argument("--tag", default=None, help="suffix of the result file name, for a second call on one card and day")
    args = ap.parse_args()
    train = rows(args.data, "train")
    if max(args.greedy, args.mbr) > len(train):  # before any GPU time is spent
        ap.error(f"--greedy/--mbr: {args.data}'s train split has {len(train)} dialogues")
    require_cuda("summarize_speed.py")
    from phi2sum.config import load_config
    from phi2sum.runs import saved_config

    result = {**environment(), "question": "summarize_speed", "command": command_line(),
              "path": "phi2sum.summarize.run, as `phi2sum summarize CORPUS --adapter RUN --out OUT`",
              "corpus": "the first N dialogues of DialogSum's train split", "runs": []}
    raw = raw_dir("summarize_speed", result["card"], result["date"])
    cases = [("greedy", "greedy", args.greedy, GREEDY), ("run's decoding", "run", args.mbr, [])]  # name, file stem, ...
    for name, stem, n, sets in cases:
        if n <= 0:
            continue

        def measure(name=name, stem=stem, n=n, sets=sets):
            inputs = corpus(train, n, raw / f"corpus-{n}.jsonl")
            cfg = load_config(args.run / "config.yaml", sets, saved_config(args.run))  # as the CLI reads a run
            return timed_summarize(name, cfg, args.run, inputs, raw / f"{stem}-{n}.jsonl")

        run_case(result, name, measure)
    lines = table(["case", "decoding", "dialogues", "every id once", "dialogues/s", "seconds", "run-on",
                   "peak reserved GiB"], "llrlrrrr", result["runs"], lambda r: [
        r["decoding"], f"{r['dialogues']:,}", "yes" if r["every_id_once"] else "NO", f"{r['dialogues_per_s']:.1f}",
        f"{r['seconds']:.1f}", f"{r['run_on_share']:.1%}", f"{r['peak_reserved_gib']:.1f}"])
    print(write_result("summarize_speed", result, lines, args.tag))


if __name__ == "__main__":
    main()
