"""CPU time of minimum-Bayes-risk selection: the first implementation (rouge-score's LCS table for every pair) vs
`evaluate.mbr_pick`, on the final run's 500 test summaries grouped into candidate sets (all distinct texts: no
help from deduplication). Tokenization is warmed first, as the cache does in an eval. Process time, best of
--repeats, for --rounds rounds: on a shared machine the rounds differ by up to 2x.

    python3 bench/mbr_speed.py --out bench/results/session6/mbr_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phi2sum import evaluate  # noqa: E402


def all_pairs(texts: list[str]) -> int:
    """The first mbr_pick (commit 24bcaf3): n-grams built once per text, then rouge-score over every pair."""
    from rouge_score import rouge_scorer

    tokens = [evaluate._rouge_tokenize(t) for t in texts]
    grams = [(rouge_scorer._create_ngrams(t, 1), rouge_scorer._create_ngrams(t, 2)) for t in tokens]
    support = np.zeros(len(texts))
    for a in range(len(texts)):
        for b in range(a + 1, len(texts)):
            s = (rouge_scorer._score_ngrams(grams[a][0], grams[b][0]).fmeasure
                 + rouge_scorer._score_ngrams(grams[a][1], grams[b][1]).fmeasure
                 + rouge_scorer._score_lcs(tokens[a], tokens[b]).fmeasure) / 3
            support[a] += s
            support[b] += s
    return int(np.flatnonzero(support >= support.max() - 1e-9)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5, help="timings per method and round; the best is kept")
    ap.add_argument("--rounds", type=int, default=3, help="whole measurements, to show the spread between them")
    a = ap.parse_args()
    preds = [json.loads(x)["prediction"] for x in open(ROOT / "docs/results/smollm2/test_predictions.jsonl")]
    rows = []
    for n in [16, 32, 64] * a.rounds:
        sets = [preds[i * n : (i + 1) * n] for i in range(len(preds) // n)]
        for s in sets:
            for t in s:
                evaluate._rouge_tokenize(t)
        timing = {}
        for name, fn in (("rouge_score_all_pairs", all_pairs), ("mbr_pick", evaluate.mbr_pick)):
            best = float("inf")
            for _ in range(a.repeats):
                start = time.process_time()
                picks = [fn(s) for s in sets]
                best = min(best, (time.process_time() - start) / len(sets))
            timing[name] = (best, picks)
        row = {"candidates": n, "sets": len(sets),
               "seconds_per_dialogue": {k: round(v[0], 4) for k, v in timing.items()},
               "speedup": round(timing["rouge_score_all_pairs"][0] / timing["mbr_pick"][0], 1),
               "same_picks": timing["rouge_score_all_pairs"][1] == timing["mbr_pick"][1]}
        rows.append(row)
        print(json.dumps(row))
    a.out.write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "python": platform.python_version(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
