"""MBR with separate evidence, on the CPU: candidates from one eval, evidence (pseudo-references) from another.

    phi2sum eval --adapter RUN --compare none --set eval.save_candidates=true --out RUN/eval-t05
    phi2sum eval --adapter RUN --compare none --set eval.save_candidates=true \\
        --set generation.temperature=1.0 --out RUN/eval-t10
    python3 bench/mbr_evidence.py RUN/eval-t05/predictions.jsonl RUN/eval-t10/predictions.jsonl --out DIR \\
        [--ks 16,32,64] [--js 8,16,32,64] [--write 64,64]
    python3 bench/mbr_evidence.py RUN/eval/predictions.jsonl --out DIR     # one eval with generation.mbr_evidence

With one file (an eval with generation.mbr_evidence and eval.save_candidates), the evidence is each row's saved
`evidence`, and the full k x j variant must give back the file's predictions (else exit 1).

Both files are evals of one split (same ids, references; .jsonl or .jsonl.gz) with saved candidates. For each k
in --ks and j in --js, every dialogue's summary is the candidate among the first k of the first file with the
highest mean ROUGE-1/2/L F1 against the first j samples of the second (evaluate.mbr_pick with evidence: what
`phi2sum eval` does with generation.mbr_evidence). Also scored: the first file's own choice (its candidates as
their own evidence, which must give back its predictions, else exit 1) and the second's. ROUGE as eval reports
it (pairs, stemming per the first file's metrics.json), differences from the first file's own choice with a
paired bootstrap 95% interval over dialogues. The samples of a one-call eval with mbr_evidence are other draws
(candidates and evidence come from one seeded stream there), so an eval with the same settings differs within
noise. Both evals sampled from seed 0 in the same batches, so candidate i and evidence sample i share their random
numbers (their first words agree more often than other pairs'); a one-call eval's evidence comes later in the
stream, independent. --write K,J also writes that variant: DIR/predictions.jsonl (with candidates and evidence)
and DIR/metrics.json (the candidates eval's, with this selection's scores; run-on per candidate is not known). Cost: ~1-2 min per variant for 500 dialogues on the 2-core dev machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from mbr_pool import fail, read_rows  # noqa: E402

from phi2sum import evaluate  # noqa: E402

MAIN = ("rouge1", "rouge2", "rougeL")


def read(path: Path) -> tuple[list[dict], dict]:
    rows = read_rows(path)
    if not rows or not all(r.get("candidates") and "references" in r and "id" in r for r in rows):
        fail(f"{path}: rows without candidates (eval with generation.mbr_candidates >= 2 and "
             "eval.save_candidates: true)")
    metrics = path.parent / "metrics.json"
    return rows, (json.loads(metrics.read_text()) if metrics.is_file() else {})


def ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        fail(f"{name}: give counts >= 1 separated by commas, e.g. 16,32,64 (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidates", type=Path, help="predictions.jsonl(.gz) whose candidates are chosen from")
    ap.add_argument("evidence", type=Path, nargs="?",
                    help="predictions.jsonl(.gz) whose candidates are the evidence (default: the first file's saved "
                         "evidence)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ks", default="64", help="candidates: the first k of the first file's")
    ap.add_argument("--js", default="64", help="evidence: the first j of the second file's")
    ap.add_argument("--write", help="K,J: also write this variant's predictions.jsonl and metrics.json")
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    args = ap.parse_args(argv)
    ks, js = ints(args.ks, "--ks"), ints(args.js, "--js")
    write = ints(args.write, "--write") if args.write else None
    if write and len(write) != 2:
        fail(f"--write: give K,J (got {args.write!r})")
    rows, meta = read(args.candidates)
    if args.evidence is None:
        if not all(r.get("evidence") for r in rows):
            fail(f"{args.candidates}: rows without evidence (eval with generation.mbr_evidence >= 1 and "
                 "eval.save_candidates: true), or name the evidence file")
        evid = [{**r, "candidates": r["evidence"]} for r in rows]
        gen = meta.get("generation", {})
        evid_meta = {**meta, "generation": {**gen, "temperature": gen.get("mbr_evidence_temperature")}}
    else:
        evid, evid_meta = read(args.evidence)
    if [r["id"] for r in rows] != [r["id"] for r in evid] or [r["references"] for r in rows] != [
            r["references"] for r in evid]:
        fail("the two files are not evals of the same dialogues in the same order with the same references")
    n_cand, n_evid = min(len(r["candidates"]) for r in rows), min(len(r["candidates"]) for r in evid)
    if max(ks) > n_cand or max(js) > n_evid or (write and (write[0] > n_cand or write[1] > n_evid)):
        fail(f"the files hold {n_cand} candidates and {n_evid} evidence samples per dialogue; ask for no more")
    stem = meta.get("use_stemmer", True)
    refs = [r["references"] for r in rows]
    counts = np.array([len(x) for x in refs], dtype=float)
    draws = np.random.default_rng(0).integers(0, len(rows), size=(args.samples, len(rows)))

    done: dict[tuple, list[int]] = {}  # a selection the check below made is not made again in the variants

    def picks(k: int | None, j: int | None, source: list[dict] = rows) -> list[int]:
        key = (k, j, source is rows)
        if key not in done:
            done[key] = ([evaluate.mbr_pick(r["candidates"][:k]) for r in source] if j is None  # own evidence
                         else [evaluate.mbr_pick(r["candidates"][:k], evidence=e["candidates"][:j])
                               for r, e in zip(source, evid)])
        return done[key]

    def scored(texts: list[str]) -> tuple[evaluate.RougeResult, np.ndarray]:
        result = evaluate.rouge(texts, refs, stem)
        return result, np.stack([result.per_dialogue_sum[m] for m in MAIN])

    own = picks(n_cand, None)
    # The file's predictions must come back: from its own rule, or (one file with evidence) from the full k x j.
    given = own if args.evidence else picks(n_cand, n_evid)
    rule = "candidates' own MBR" if args.evidence else "MBR against the saved evidence"
    mismatches = sum(r["candidates"][p] != r["prediction"] for r, p in zip(rows, given))
    base_result, base = scored([r["candidates"][p] for r, p in zip(rows, own)])
    variants = [("candidates' own MBR", n_cand, None, rows), ("evidence file's own MBR", n_evid, None, evid)]
    variants += [(f"first {k} candidates vs first {j} evidence", k, j, rows) for k in ks for j in js]
    out, chosen = [], {}
    for name, k, j, source in variants:
        pick = picks(k, j, source)
        texts = [r["candidates"][p] for r, p in zip(source, pick)]
        result, sums = scored(texts)
        diff = np.vstack([sums - base, (sums - base).mean(0)])
        boot = diff[:, draws].sum(-1) / counts[draws].sum(-1)
        out.append({"variant": name, "k": k, "j": j, **{m: result.pairs[m] for m in evaluate.METRICS},
                    "mean": float(np.mean([result.pairs[m] for m in MAIN])),
                    "mean_words": float(np.mean([evaluate.words(t) for t in texts])),
                    "vs_own": {m: float(x.sum() / counts.sum()) for m, x in zip((*MAIN, "mean"), diff)},
                    "vs_own_ci95": {m: [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]
                                    for m, b in zip((*MAIN, "mean"), boot)}})
        print(f"{name}: " + " / ".join(f"{result.pairs[m]:.4f}" for m in MAIN), flush=True)
        if write and (k, j) == tuple(write):
            chosen = {"pick": pick, "result": result}
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"candidates_file": str(args.candidates), "evidence_file": str(args.evidence or args.candidates),
               "dialogues": len(rows), "pairs": int(counts.sum()), "use_stemmer": stem,
               "own_predictions_given_back": len(rows) - mismatches, "given_back_by": rule,
               "variants": out}
    (args.out / "mbr_evidence.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# MBR with separate evidence: {args.candidates} vs {args.evidence or 'its saved evidence'}", "",
             f"{len(rows)} dialogues, {int(counts.sum())} pairs; Δ: minus the candidates' own MBR (paired bootstrap "
             "95% interval over dialogues).", "",
             "| variant | R1 | R2 | RL | RLsum | mean | words | Δmean [95%] | ΔR1 | ΔR2 | ΔRL |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for v in out:
        lo, hi = v["vs_own_ci95"]["mean"]
        lines.append(f"| {v['variant']} | {v['rouge1']:.4f} | {v['rouge2']:.4f} | {v['rougeL']:.4f} "
                     f"| {v['rougeLsum']:.4f} | {v['mean']:.4f} | {v['mean_words']:.1f} "
                     f"| {v['vs_own']['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {v['vs_own']['rouge1']:+.4f} "
                     f"| {v['vs_own']['rouge2']:+.4f} | {v['vs_own']['rougeL']:+.4f} |")
    (args.out / "mbr_evidence.md").write_text("\n".join(lines) + "\n")
    if write:
        # eval's metrics.json (the candidates eval's, so push and readers find every field) with this selection's
        # scores; seconds and throughput are left out (no eval ran), run-on is not known per candidate.
        result, pick = chosen["result"], chosen["pick"]
        ci = evaluate.bootstrap_ci(result, meta.get("bootstrap_samples", 1000) or 1000)
        texts = [r["candidates"][p] for r, p in zip(rows, pick)]
        model = {k: v for k, v in meta.get("models", {}).get("fine-tuned", {}).items()
                 if k not in ("seconds", "dialogues_per_second", "run_on_share")}
        model.update({m: {"mean": result.pairs[m], "ci95": ci[m]} for m in evaluate.METRICS})
        model.update(first_reference=result.first, mean_words=float(np.mean([evaluate.words(t) for t in texts])),
                     reference_mean_words=float(np.mean([evaluate.words(x) for rs in refs for x in rs])),
                     run_on_share=None)
        new_tokens = [r.get("candidate_new_tokens") for r in rows]
        limit = meta.get("generation", {}).get("max_new_tokens", 96)
        model["hit_max_new_tokens_share"] = (float(np.mean([t[p] >= limit for t, p in zip(new_tokens, pick)]))
                                             if all(new_tokens) else None)
        evidence_temperature = evid_meta.get("generation", {}).get("temperature")
        metrics = {**meta, "n_dialogues": len(rows), "n_pairs": int(counts.sum()), "use_stemmer": stem,
                   "selection": f"first {write[0]} candidates of {args.candidates} against the first {write[1]} "
                                f"samples of {args.evidence or 'its saved evidence'} "
                                "(bench/mbr_evidence.py, on the CPU)",
                   "generation": {**meta.get("generation", {}), "mbr_candidates": write[0], "mbr_evidence": write[1],
                                  "mbr_evidence_temperature": evidence_temperature},
                   "models": {"fine-tuned": model}}
        metrics.setdefault("protocol", "mean over dialogue-reference pairs")
        metrics.setdefault("bootstrap_samples", 1000)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        with (args.out / "predictions.jsonl").open("w") as f:
            for r, e, p in zip(rows, evid, pick):
                n = r.get("candidate_new_tokens")
                f.write(json.dumps({"id": r["id"], "dialogue": r.get("dialogue"), "references": r["references"],
                                    "prediction": r["candidates"][p], **({"new_tokens": n[p]} if n else {}),
                                    "candidates": r["candidates"][: write[0]],
                                    "evidence": e["candidates"][: write[1]]}) + "\n")
    if mismatches:
        print(f"error: the {rule} did not give back {mismatches} of the file's {len(rows)} predictions "
              "(not the eval's selection)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
