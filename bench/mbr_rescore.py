"""Re-select MBR summaries from saved candidates, on the CPU: how many candidates and which ROUGE mix to agree on.

    phi2sum eval ... --set generation.mbr_candidates=64 --set eval.save_candidates=true --out RUN/eval-validation
    python3 bench/mbr_rescore.py RUN/eval-validation/predictions.jsonl [RUN/eval-test/predictions.jsonl] --out DIR

From one GPU eval per split this scores, per file: the first candidate alone, MBR over the first k candidates
for each k in --ks (up to all of them), agreeing on ROUGE-1/2/L together (the shipped rule) or on one or two of
them, and the oracle (the candidate with the best mean ROUGE-1/2/L against the references: a ceiling on that
mean, not a decoding). ROUGE as eval reports it (mean over dialogue-reference pairs; stemming as in the
eval's metrics.json). Each variant's difference from the shipped rule over all candidates comes with a
paired bootstrap 95% interval over dialogues: with ~20 variants on 500 dialogues, most gaps are noise.
Rescoring with the shipped rule must give back the file's own predictions; if not, the script says so and
exits 1. Sampled candidates are independent draws, so the first k are what k samples would give; beam
candidates are not (the first k of n beams are not a k-beam search), and are labelled so.
Cost: ~4 min for 500 dialogues x 64 candidates on the 2-core dev machine (timed while other jobs ran), mostly
scoring candidates against the references (the oracle) and the picks of each variant.
Choose on validation, then read test. Writes DIR/mbr_rescore.json and DIR/mbr_rescore.md.
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
MAIN = ("rouge1", "rouge2", "rougeL")


def rescore(path: Path, ks: list[int], samples: int = 1000) -> dict:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    missing = [r["id"] for r in rows if not r.get("candidates")]
    if missing:
        raise SystemExit(f"{path}: {len(missing)} rows have no candidates "
                         "(eval with generation.mbr_candidates >= 2 and eval.save_candidates: true)")
    metrics_file = path.parent / "metrics.json"
    meta = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    stem = meta.get("use_stemmer", True)
    sampled = meta.get("generation", {}).get("do_sample", True)
    n = min(len(r["candidates"]) for r in rows)
    refs = [r["references"] for r in rows]
    counts = np.array([len(x) for x in refs], dtype=float)

    def mean3(result) -> np.ndarray:  # per dialogue: sum over its pairs of mean(R1, R2, RL)
        return sum(result.per_dialogue_sum[m] for m in MAIN) / 3

    shipped = (n, UTILITIES["R1+R2+RL"])  # mbr_pick's default weights over all candidates
    shipped_texts = [r["candidates"][:n][evaluate.mbr_pick(r["candidates"][:n], shipped[1])] for r in rows]
    base = mean3(evaluate.rouge(shipped_texts, refs, stem))
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(rows), size=(samples, len(rows)))

    def score(name: str, picks: list[str]) -> dict:
        result = evaluate.rouge(picks, refs, stem)
        diff = mean3(result) - base
        boot = diff[draws].sum(axis=1) / counts[draws].sum(axis=1)
        row = {"variant": name, **{m: result.pairs[m] for m in (*MAIN, "rougeLsum")},
               "mean_words": float(np.mean([evaluate.words(p) for p in picks])),
               "vs_shipped": float(diff.sum() / counts.sum()),
               "vs_shipped_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}
        print(json.dumps(row), flush=True)
        return row

    out = {"file": str(path), "dialogues": len(rows), "candidates": n, "sampled": sampled, "use_stemmer": stem,
           "variants": []}
    out["mismatches"] = sum(a != r["prediction"] for a, r in zip(shipped_texts, rows))
    out["variants"].append(score("first candidate (one sample)" if sampled else "first candidate (the top beam)",
                                 [r["candidates"][0] for r in rows]))
    beams = "" if sampled else " (first k of the beams, not a k-beam search)"
    for k in sorted({min(k, n) for k in ks}):
        for name, weights in UTILITIES.items():
            picks = shipped_texts if (k, weights) == shipped else [
                r["candidates"][:k][evaluate.mbr_pick(r["candidates"][:k], weights)] for r in rows]
            out["variants"].append(score(f"MBR k={k}{beams}, agree on {name}", picks))

    def oracle_pick(candidates: list[str], references: list[str]) -> str:
        per = evaluate.rouge(candidates, [references] * len(candidates), stem)
        return candidates[int(np.argmax(mean3(per)))]

    out["variants"].append(score(f"oracle over {n} (uses the references)",
                                 [oracle_pick(r["candidates"][:n], r["references"]) for r in rows]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("predictions", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ks", default="8,16,32,64", help="candidate counts to try (the first k of each list)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if not ks or min(ks) < 1:
        raise SystemExit(f"--ks: give candidate counts >= 1, e.g. 8,16,32 (got {args.ks!r})")
    results = [rescore(p, ks) for p in args.predictions]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mbr_rescore.json").write_text(json.dumps(results, indent=2))
    lines = ["# MBR re-selection from saved candidates", ""]
    for res in results:
        lines += [f"`{res['file']}`: {res['dialogues']} dialogues, {res['candidates']} candidates each "
                  f"({'samples' if res['sampled'] else 'beams'}); the shipped rule over all of them reproduces "
                  f"{res['dialogues'] - res['mismatches']} of {res['dialogues']} saved predictions. "
                  "Last column: mean of ROUGE-1/2/L minus the shipped rule's, paired bootstrap 95% interval.", "",
                  "| variant | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | words | vs shipped |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {v['variant']} | {v['rouge1']:.4f} | {v['rouge2']:.4f} | {v['rougeL']:.4f} | {v['rougeLsum']:.4f} "
                  f"| {v['mean_words']:.1f} | {v['vs_shipped']:+.4f} [{v['vs_shipped_ci95'][0]:+.4f}, "
                  f"{v['vs_shipped_ci95'][1]:+.4f}] |" for v in res["variants"]]
        lines.append("")
    (args.out / "mbr_rescore.md").write_text("\n".join(lines))
    print("\n".join(lines))
    bad = [r for r in results if r["mismatches"]]
    if bad:
        raise SystemExit(f"the shipped rule did not reproduce {sum(r['mismatches'] for r in bad)} saved predictions "
                         f"({', '.join(r['file'] for r in bad)}): the candidates are not the ones eval chose from")


if __name__ == "__main__":
    main()
