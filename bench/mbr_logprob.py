"""Does the model's own probability help MBR choose? Re-selection on the CPU from one eval's saved candidates.

    phi2sum eval --adapter RUN --compare none --set eval.save_candidates=true --out RUN/eval-validation
    python3 bench/mbr_logprob.py RUN/eval-validation/predictions.jsonl[.gz] --out DIR [--weights 0.01,0.1]

The eval must have sampled through phi2sum's CUDA-graph loop, which saves each candidate's summed log-probability
(`candidate_logprobs`, temperature 1, stop token included) and new-token count. Per dialogue the pick is the
candidate with the highest support + w x log-probability, support being the mean ROUGE-1/2/L F1 against the other
candidates (mbr_pick's, averaged; w = 0 is the eval's own rule and must give back its predictions, else exit 1), the
log-probability per token (its count, + 1 for the stop token unless it hit max_new_tokens) or summed (favours short candidates). ROUGE as eval
reports it; differences from w = 0 with a paired bootstrap 95% interval over dialogues. Writes
DIR/mbr_logprob_<file's folder>.json and .md. Cost: ~1 min for 500 dialogues x 64 on the 2-core dev machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from mbr_evidence import MAIN, fail, read  # noqa: E402

from phi2sum import evaluate  # noqa: E402


def supports(texts: list[str]) -> np.ndarray:
    """Each candidate's mean ROUGE-1/2/L F1 against the other candidates: mbr_pick's supports over the n - 1
    others, so that w weighs a log-probability against an F1."""
    return evaluate.mbr_supports(texts) / max(1, len(texts) - 1)


def floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        fail(f"{name}: give weights > 0 separated by commas, e.g. 0.01,0.1 (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights", default="0.01,0.02,0.05,0.1,0.2", help="w for the per-token log-probability")
    ap.add_argument("--sum-weights", default="0.001,0.003,0.01", help="w for the summed log-probability")
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    args = ap.parse_args(argv)
    rows, meta = read(args.predictions)
    if not all(r.get("candidate_logprobs") for r in rows):
        fail(f"{args.predictions}: no candidate_logprobs (an eval whose samples came from phi2sum's CUDA-graph "
             "loop, with eval.save_candidates: true, saves them)")
    weights = [("per token", w) for w in floats(args.weights, "--weights")]
    weights += [("sum", w) for w in floats(args.sum_weights, "--sum-weights")]
    limit = meta.get("generation", {}).get("max_new_tokens", 96)
    refs = [r["references"] for r in rows]
    counts = np.array([len(x) for x in refs], dtype=float)
    support = [supports(r["candidates"]) for r in rows]
    draws = np.random.default_rng(0).integers(0, len(rows), size=(args.samples, len(rows)))
    base, out, mismatches = None, [], 0
    for kind, w in [("none", 0.0)] + weights:
        texts = []
        for r, s in zip(rows, support):
            lp = np.array(r["candidate_logprobs"])
            # the stop token's log-probability is in the sum unless the sample ran to max_new_tokens
            n = np.array(r["candidate_new_tokens"])
            feature = lp / (n + (n < limit)) if kind == "per token" else lp
            score = s + w * feature if kind != "none" else s
            texts.append(r["candidates"][int(np.flatnonzero(score >= score.max() - 1e-9)[0])])
        if kind == "none":
            mismatches = sum(t != r["prediction"] for t, r in zip(texts, rows))
        result = evaluate.rouge(texts, refs, meta.get("use_stemmer", True))
        sums = np.stack([result.per_dialogue_sum[m] for m in MAIN])
        base = sums if base is None else base
        diff = np.vstack([sums - base, (sums - base).mean(0)])
        boot = diff[:, draws].sum(-1) / counts[draws].sum(-1)
        out.append({"log_probability": kind, "weight": w, **{m: result.pairs[m] for m in MAIN},
                    "mean": float(np.mean([result.pairs[m] for m in MAIN])),
                    "mean_words": float(np.mean([evaluate.words(t) for t in texts])),
                    "vs_none_mean": float(diff[3].sum() / counts.sum()),
                    "vs_none_mean_ci95": [float(np.percentile(boot[3], 2.5)), float(np.percentile(boot[3], 97.5))]})
        print(f"{kind} w={w:g}: " + " / ".join(f"{result.pairs[m]:.4f}" for m in MAIN), flush=True)
    label = args.predictions.parent.name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"mbr_logprob_{label}.json").write_text(json.dumps(
        {"file": str(args.predictions), "dialogues": len(rows), "own_predictions_given_back": len(rows) - mismatches,
         "variants": out}, indent=1))
    lines = [f"# MBR support + w x log-probability: {args.predictions}", "",
             "| log-probability | w | R1 | R2 | RL | mean | words | Δmean [95%] |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {v['log_probability']} | {v['weight']:g} | {v['rouge1']:.4f} | {v['rouge2']:.4f} | {v['rougeL']:.4f} "
              f"| {v['mean']:.4f} | {v['mean_words']:.1f} | {v['vs_none_mean']:+.4f} [{v['vs_none_mean_ci95'][0]:+.4f}, "
              f"{v['vs_none_mean_ci95'][1]:+.4f}] |" for v in out]
    (args.out / f"mbr_logprob_{label}.md").write_text("\n".join(lines) + "\n")
    if mismatches:
        print(f"error: w = 0 did not give back {mismatches} of the file's {len(rows)} predictions", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
