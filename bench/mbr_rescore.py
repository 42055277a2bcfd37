"""Re-select MBR summaries from saved candidates, on the CPU: how many candidates and which ROUGE mix to agree on.

    python3 bench/mbr_rescore.py RUN/eval-validation/predictions.jsonl [RUN/eval-test/predictions.jsonl] --out DIR

`phi2sum eval` with generation.mbr_candidates writes every candidate next to its pick (`candidates` in
predictions.jsonl). From one GPU eval this script scores, per file: the first candidate alone (one sample),
MBR over the first k candidates for each k in --ks (up to all of them), agreeing on ROUGE-1/2/L together (the
shipped rule) or on one of them, and the oracle (the candidate closest to the references: a ceiling that
needs the references, not a decoding). ROUGE as eval reports it (mean over dialogue-reference pairs,
stemmed). Rescoring all candidates with the shipped rule must give back the file's own predictions: the
`mismatches` field checks it. Choose on validation, then read test. Writes DIR/mbr_rescore.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phi2sum import evaluate  # noqa: E402

UTILITIES = {"R1+R2+RL": (1.0, 1.0, 1.0), "R1": (1.0, 0.0, 0.0), "R2": (0.0, 1.0, 0.0), "RL": (0.0, 0.0, 1.0),
             "R2+RL": (0.0, 1.0, 1.0)}


def per_text_rouge(text: str, refs: list[str]) -> float:
    r = evaluate.rouge([text], [refs])
    return (r.pairs["rouge1"] + r.pairs["rouge2"] + r.pairs["rougeL"]) / 3


def rescore(path: Path, ks: list[int]) -> dict:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    missing = [r["id"] for r in rows if not r.get("candidates")]
    if missing:
        raise SystemExit(f"{path}: {len(missing)} rows have no candidates (eval with generation.mbr_candidates >= 2)")
    n = min(len(r["candidates"]) for r in rows)
    refs = [r["references"] for r in rows]

    def score(name: str, picks: list[str]) -> dict:
        result = evaluate.rouge(picks, refs)
        row = {"variant": name, **{m: result.pairs[m] for m in ("rouge1", "rouge2", "rougeL")},
               "mean_words": float(np.mean([evaluate.words(p) for p in picks]))}
        print(json.dumps(row), flush=True)
        return row

    out = {"file": str(path), "dialogues": len(rows), "candidates": n, "variants": []}
    out["variants"].append(score("first candidate (one sample)", [r["candidates"][0] for r in rows]))
    shipped = [r["candidates"][evaluate.mbr_pick(r["candidates"])] for r in rows]
    out["mismatches"] = sum(a != r["prediction"] for a, r in zip(shipped, rows))
    for k in sorted({min(k, n) for k in ks}):
        for name, weights in UTILITIES.items():
            picks = [r["candidates"][:k][evaluate.mbr_pick(r["candidates"][:k], weights)] for r in rows]
            out["variants"].append(score(f"MBR k={k}, agree on {name}", picks))
    oracle = [max(r["candidates"][:n], key=lambda t, refs=r["references"]: per_text_rouge(t, refs)) for r in rows]
    out["variants"].append(score(f"oracle over {n} (uses the references)", oracle))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("predictions", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ks", default="8,16,32,64", help="candidate counts to try (the first k of each list)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    results = [rescore(p, ks) for p in args.predictions]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mbr_rescore.json").write_text(json.dumps(results, indent=2))
    lines = ["# MBR re-selection from saved candidates", ""]
    for res in results:
        lines += [f"`{res['file']}`: {res['dialogues']} dialogues, {res['candidates']} candidates each; "
                  f"the shipped rule over all of them reproduces {res['dialogues'] - res['mismatches']} of "
                  f"{res['dialogues']} saved predictions", "",
                  "| variant | ROUGE-1 | ROUGE-2 | ROUGE-L | words |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {v['variant']} | {v['rouge1']:.4f} | {v['rouge2']:.4f} | {v['rougeL']:.4f} | {v['mean_words']:.1f} |"
                  for v in res["variants"]]
        lines.append("")
    (args.out / "mbr_rescore.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
