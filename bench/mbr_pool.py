"""MBR over candidates pooled from several models, on the CPU: does an ensemble's consensus beat one model?
(With one model: how many candidates, and which ROUGE mix to agree on.)

    phi2sum eval ... --set generation.mbr_candidates=64 --set eval.save_candidates=true --out RUN_A/eval-validation
    python3 bench/mbr_pool.py --out DIR --label validation s42=RUN_A/eval-validation/predictions.jsonl \\
        s1=RUN_B/eval-validation/predictions.jsonl full=RUN_C/eval-validation/predictions.jsonl [--ks 8,16,32,64]

Each file is an eval's predictions.jsonl (or the same gzipped, .jsonl.gz, next to its metrics.json). The files must
be evals of the same split (same ids in the same order, same references), each with its saved candidates. Per
dialogue the candidates of all models are concatenated (models in the order given, each in generation order) and
every pair of distinct texts gets its ROUGE-1/2/L F1 once, as eval's mbr_pick scores a pair (its stemmed tokens and
rouge-score's formulas; mbr_pick always stems, so the pairs do too, whatever the eval's use_stemmer). Each distinct
candidate is also scored once against the references, as eval scores a prediction (stemming per the eval's
metrics.json), so any selection's ROUGE is a lookup.

Variants: every non-empty set of models (with more than 4 models: each alone, all, and all but one), the first k
candidates of each model in the set for each k in --ks (plus all of them for a model alone: eval's own pick), and
each utility in UTILITIES. A pick is the candidate with the highest weighted ROUGE against all the other
pooled candidates (a text's other copies count, as in mbr_pick), ties to the earliest. Pooling independently
trained models is an ensemble at the summary level: the consensus of their samples. Per set of models, the oracle
(the candidate with the best mean ROUGE-1/2/L against the references) is a ceiling on that mean, not a decoding.

Numbers: ROUGE F1 as eval reports it, the mean over dialogue-reference pairs. Each variant's difference from the
baseline (the first model alone, all its candidates, R1+R2+RL: what its eval shipped) comes with a paired
bootstrap 95% interval over dialogues; with hundreds of variants, a few intervals miss 0 by chance alone.
Choose on validation, then read test. Each model alone with all its candidates must give back its file's own
predictions; if not, the script says how many differ and exits 1 (after writing its outputs).

Cost: scoring is the slow part, parallel over dialogues (--workers, default all cores): ~4 min for 500 dialogues x
(4 x 64) candidates (~175 distinct) with 1-3 references on 2 cores, 4/5 of it rouge-score against the references
(the pairs are vectorized, ~0.1 s a dialogue). It is cached in DIR/mbr_pool_<label>.npz (keyed by a hash of the
files), so a re-run with other --ks or --samples takes seconds (~15 s for the ~300 variants of 4 models).
Writes DIR/mbr_pool_<label>.json and DIR/mbr_pool_<label>.md.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the worker processes are the parallelism: one thread each
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from phi2sum import evaluate  # noqa: E402

# What the candidates may agree on: the shipped rule (all three ROUGEs) and one or two of them.
UTILITIES = {"R1+R2+RL": (1.0, 1.0, 1.0), "R1": (1.0, 0.0, 0.0), "R2": (0.0, 1.0, 0.0), "RL": (0.0, 0.0, 1.0),
             "R2+RL": (0.0, 1.0, 1.0)}
MAIN = ("rouge1", "rouge2", "rougeL")

CACHE_VERSION = "1"  # bump when what the cache holds changes


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_rows(path: Path, label: str = "") -> list[dict]:
    """An eval's predictions.jsonl, or the same gzipped (committed results keep candidates so), as rows; a missing,
    cut-off, non-UTF-8 or non-JSON file is one clear error, prefixed with `label`."""
    if not path.is_file():
        fail(f"{label}no such file {path}")
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:  # gzip, UTF-8 or JSON damage
        fail(f"{label}{path} is not an eval's predictions.jsonl(.gz) ({str(e).splitlines()[0]})")


def read_models(specs: list[str]) -> tuple[list[str], list[list[dict]], bool]:
    """NAME=predictions.jsonl arguments -> names, rows per model, use_stemmer; every mismatch is one clear error."""
    names, files, stems = [], [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            fail(f"{spec!r}: give each model as NAME=path/to/predictions.jsonl")
        if name in names:
            fail(f"model name {name!r} given twice")
        path = Path(path)
        rows = read_rows(path, f"{name}: ")
        metrics = path.parent / "metrics.json"
        stems.add(json.loads(metrics.read_text()).get("use_stemmer", True) if metrics.is_file() else True)
        names.append(name)
        files.append(rows)
    if len(stems) > 1:
        fail("the evals disagree on use_stemmer (metrics.json): their ROUGE is not comparable")
    first = files[0]
    for name, rows in zip(names, files):
        lacking = [key for key in ("id", "references", "prediction") if not rows or any(key not in r for r in rows)]
        if lacking:
            fail(f"{name}: rows without {', '.join(lacking)}: not an eval's predictions.jsonl")
        if not all(r.get("candidates") for r in rows):
            fail(f"{name}: {sum(not r.get('candidates') for r in rows)} rows have no candidates (eval with "
                 "generation.mbr_candidates >= 2 and eval.save_candidates: true)")
        if len({len(r["candidates"]) for r in rows}) > 1:
            fail(f"{name}: rows have different numbers of candidates ({sorted({len(r['candidates']) for r in rows})})")
        if [r["id"] for r in rows] != [r["id"] for r in first]:
            row = next((i for i, (a, b) in enumerate(zip(rows, first)) if a["id"] != b["id"]),
                       min(len(rows), len(first)))
            fail(f"{name} and {names[0]} are not the same dialogues in the same order ({len(rows)} vs {len(first)} "
                 f"rows; first difference at row {row})")
        if [r["references"] for r in rows] != [r["references"] for r in first]:
            fail(f"{name} and {names[0]} have the same ids but different references: not the same split")
    return names, files, stems.pop()


def pair_counts(job: tuple[list[str], list[str], bool]) -> tuple[np.ndarray, ...]:
    """One dialogue's distinct candidates -> token counts, the upper triangles of the shared unigram, bigram and LCS
    counts of every pair (ROUGE F1 follows from these exactly), and each text's ROUGE against the references
    (the sum over references, per metric, as evaluate.rouge adds them up)."""
    texts, references, stem = job
    tokens = [evaluate._rouge_tokenize(t) for t in texts]  # mbr_pick's tokens
    upper = np.triu_indices(len(texts))
    pairs = evaluate.pair_overlaps(tokens)  # as mbr_pick counts them
    ref = evaluate.rouge(texts, [references] * len(texts), stem).per_dialogue_sum
    return (np.array([len(t) for t in tokens]), *(p[upper].astype(np.uint16) for p in pairs),
            np.stack([ref[m] for m in evaluate.METRICS]))


def rouge_matrices(counts: dict, d: int) -> np.ndarray:
    """(3, m, m): ROUGE-1, ROUGE-2, ROUGE-L F1 of every pair of dialogue d's distinct candidates."""
    m = int(counts["m"][d])
    start, tri = counts["starts"][d], counts["tri_starts"][d]
    upper = np.triu_indices(m)
    shared = np.zeros((3, m, m))
    for matrix, name in zip(shared, ("o1", "o2", "lcs")):
        matrix[upper] = counts[name][tri : tri + len(upper[0])]
        matrix.T[upper] = matrix[upper]
    return evaluate.pair_f1(counts["length"][start : start + m], *shared)


def score_pairs(pools: list[list[str]], references: list[list[str]], stem: bool, workers: int, cache: Path,
                key: str) -> dict:
    """pair_counts for every dialogue, from the cache when it was made from the same files."""
    if cache.is_file():
        try:
            with np.load(cache) as saved:
                if str(saved["key"]) == key:
                    print(f"pair scores from {cache}")
                    return dict(saved)
        except Exception as e:  # an unreadable cache is made again
            print(f"ignoring {cache}: {e}")
    jobs = [(list(dict.fromkeys(pool)), refs, stem) for pool, refs in zip(pools, references)]
    started, results = time.time(), []
    print(f"scoring {len(jobs)} dialogues x {len(pools[0])} candidates "
          f"({sum(len(j[0]) for j in jobs) / len(jobs):.0f} distinct on average) on {workers} worker(s)", flush=True)
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    chunk = max(1, len(jobs) // (workers * 8))
    scored = pool.imap(pair_counts, jobs, chunksize=chunk) if pool else map(pair_counts, jobs)
    for done, result in enumerate(scored, 1):
        results.append(result)
        if done % max(1, len(jobs) // 10) == 0:
            print(f"  {done}/{len(jobs)} dialogues, {time.time() - started:.0f} s", flush=True)
    if pool:
        pool.close()
    length, o1, o2, lcs, ref = zip(*results)
    counts = {"m": np.array([len(x) for x in length]), "length": np.concatenate(length), "o1": np.concatenate(o1),
              "o2": np.concatenate(o2), "lcs": np.concatenate(lcs), "ref": np.concatenate(ref, axis=1)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    with partial.open("wb") as f:  # then renamed: an interrupted run leaves no half-written cache
        np.savez_compressed(f, key=key, **counts)
    os.replace(partial, cache)
    return counts


def model_sets(count: int) -> list[tuple[int, ...]]:
    if count <= 4:
        return [s for size in range(1, count + 1) for s in itertools.combinations(range(count), size)]
    everyone = tuple(range(count))
    return [(i,) for i in everyone] + [everyone] + [tuple(j for j in everyone if j != i) for i in everyone]


def choose(counts: dict, ids: list[np.ndarray], sizes: list[int], ks: list[int]) -> dict:
    """Each variant's pick per dialogue, as an index into the dialogue's pooled candidates.
    Keys: (model set, k, utility name) for MBR, (model set, k, "oracle") for the ceiling."""
    starts = np.cumsum([0, *sizes])
    groups = []
    for models in model_sets(len(sizes)):
        own_all = {sizes[models[0]]} if len(models) == 1 else set()  # a model alone with all of them: its eval's pick
        groups += [(models, k) for k in sorted({k for k in ks if k <= min(sizes[i] for i in models)} | own_all)]
    picks: dict = collections.defaultdict(lambda: np.zeros(len(ids), dtype=np.int64))
    for d, pooled in enumerate(ids):
        pair = rouge_matrices(counts, d)
        own = np.diagonal(pair, axis1=1, axis2=2)
        ref = counts["ref"][:, counts["starts"][d] : counts["starts"][d] + counts["m"][d]]
        for models, k in groups:
            where = np.concatenate([np.arange(starts[i], starts[i] + k) for i in models])
            cand = pooled[where]
            support = pair @ np.bincount(cand, minlength=len(own[0])) - own  # (3, m): each text against the others
            for name, weights in UTILITIES.items():
                total = (np.asarray(weights) @ support)[cand] / sum(weights)
                # Equal supports summed in different orders can differ in the last bit: within 1e-9 is a tie.
                picks[models, k, name][d] = where[np.flatnonzero(total >= total.max() - 1e-9)[0]]
        for models in model_sets(len(sizes)):
            k = min(sizes[i] for i in models)
            where = np.concatenate([np.arange(starts[i], starts[i] + k) for i in models])
            picks[models, k, "oracle"][d] = where[np.argmax((ref[0] + ref[1] + ref[2])[pooled[where]] / 3)]
    return dict(picks)


def summarize(names: list[str], sizes: list[int], counts: dict, ids: list[np.ndarray], pools: list[list[str]],
              n_refs: np.ndarray, picks: dict, samples: int) -> list[dict]:
    """One row per variant: ROUGE over pairs, words, and the paired bootstrap of its difference from the baseline."""
    starts = np.cumsum([0, *sizes])
    draws = np.random.default_rng(0).integers(0, len(ids), size=(samples, len(ids)))

    def per_dialogue(pick: np.ndarray) -> np.ndarray:  # (4, dialogues): each metric summed over the references
        return counts["ref"][:, [counts["starts"][d] + ids[d][p] for d, p in enumerate(pick)]]

    base = per_dialogue(picks[(0,), sizes[0], "R1+R2+RL"])
    rows = []
    for (models, k, utility), pick in picks.items():
        sums = per_dialogue(pick)
        diff = sums[:3] - base[:3]
        diff = np.vstack([diff, diff.mean(0)])  # R1, R2, RL and their mean
        boot = diff[:, draws].sum(-1) / n_refs[draws].sum(-1)
        means = sums.sum(1) / n_refs.sum()
        owner = np.searchsorted(starts, pick, side="right") - 1  # whose candidate (the earliest copy) was picked
        rows.append({"models": [names[i] for i in models], "k": int(k), "pool": int(k) * len(models),
                     "utility": "oracle (uses the references)" if utility == "oracle" else utility,
                     **{m: float(v) for m, v in zip(evaluate.METRICS, means)}, "mean": float(means[:3].mean()),
                     "mean_words": float(np.mean([evaluate.words(pools[d][p]) for d, p in enumerate(pick)])),
                     "vs_baseline": {m: float(x.sum() / n_refs.sum()) for m, x in zip((*MAIN, "mean"), diff)},
                     "vs_baseline_ci95": {m: [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))]
                                          for m, b in zip((*MAIN, "mean"), boot)},
                     "picked_from": {names[i]: float(np.mean(owner == i)) for i in models}})
    return rows


def table(rows: list[dict]) -> list[str]:
    def cell(v: dict, m: str) -> str:
        lo, hi = v["vs_baseline_ci95"][m]
        return f"{v['vs_baseline'][m]:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    lines = ["| models | k each | pool | utility | R1 | R2 | RL | RLsum | mean | words | Δmean [95%] | ΔR1 | ΔR2 "
             "| ΔRL |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    return lines + [f"| {'+'.join(v['models'])} | {v['k']} | {v['pool']} | {v['utility']} | {v['rouge1']:.4f} "
                    f"| {v['rouge2']:.4f} | {v['rougeL']:.4f} | {v['rougeLsum']:.4f} | {v['mean']:.4f} "
                    f"| {v['mean_words']:.1f} | {cell(v, 'mean')} | {cell(v, 'rouge1')} | {cell(v, 'rouge2')} "
                    f"| {cell(v, 'rougeL')} |" for v in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=path/to/predictions.jsonl, the baseline model first")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--label", required=True, help="names the outputs and the cache, e.g. validation")
    ap.add_argument("--ks", default="8,16,32,64", help="candidates per model to pool (the first k of each)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        fail(f"--ks: give candidate counts >= 1, e.g. 8,16,32 (got {args.ks!r})")
    if not re.fullmatch(r"[\w.-]+", args.label):
        fail(f"--label {args.label!r}: letters, digits, '.', '_' and '-' only (it names files)")
    if args.samples < 1 or args.workers < 1:
        fail("--samples and --workers must be >= 1")
    names, files, stem = read_models(args.models)
    sizes = [len(rows[0]["candidates"]) for rows in files]
    pools = [[t for rows in files for t in rows[d]["candidates"]] for d in range(len(files[0]))]
    references = [r["references"] for r in files[0]]
    ids = []
    for pool in pools:
        which = {t: i for i, t in enumerate(dict.fromkeys(pool))}
        ids.append(np.array([which[t] for t in pool]))

    # The cache holds what the files and use_stemmer determine; the model names and --ks only select from it.
    key = hashlib.sha256(f"{CACHE_VERSION} {stem}".encode())
    for spec in args.models:
        key.update(hashlib.sha256(Path(spec.partition("=")[2]).read_bytes()).digest())
    counts = score_pairs(pools, references, stem, args.workers, args.out / f"mbr_pool_{args.label}.npz",
                         key.hexdigest())
    # Where each dialogue's distinct texts and pair triangles start in the flat arrays.
    counts["starts"] = np.cumsum([0, *counts["m"][:-1]])
    counts["tri_starts"] = np.cumsum([0, *(counts["m"][:-1] * (counts["m"][:-1] + 1) // 2)])

    picks = choose(counts, ids, sizes, ks)
    n_refs = np.array([len(r) for r in references], dtype=float)
    rows = summarize(names, sizes, counts, ids, pools, n_refs, picks, args.samples)
    mismatches = {name: sum(pools[d][p] != files[i][d]["prediction"]
                            for d, p in enumerate(picks[(i,), sizes[i], "R1+R2+RL"])) for i, name in enumerate(names)}
    baseline = rows[list(picks).index(((0,), sizes[0], "R1+R2+RL"))]
    mbr = sorted((v for v in rows if not v["utility"].startswith("oracle")), key=lambda v: -v["mean"])
    oracles = sorted((v for v in rows if v["utility"].startswith("oracle")), key=lambda v: -v["mean"])
    out = {"label": args.label, "files": dict(zip(names, (s.partition("=")[2] for s in args.models))),
           "dialogues": len(pools), "pairs": int(n_refs.sum()), "candidates": dict(zip(names, sizes)),
           "use_stemmer": stem, "candidate_pairs_stemmed": True, "mismatches": mismatches,
           "baseline": {k: baseline[k] for k in ("models", "k", "utility")}, "variants": mbr + oracles}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"mbr_pool_{args.label}.json").write_text(json.dumps(out, indent=1))
    head = [f"# MBR over pooled candidates: {args.label}", "",
            f"{len(pools)} dialogues ({int(n_refs.sum())} dialogue-reference pairs); candidates per model: "
            + ", ".join(f"{n} {s}" for n, s in zip(names, sizes)) + f". Baseline: {names[0]} alone, all {sizes[0]}, "
            "R1+R2+RL (its eval's pick). Eval's own picks given back: "
            + ", ".join(f"{n} {len(pools) - mismatches[n]}/{len(pools)}" for n in names) + ". Δ: minus the baseline, "
            "paired bootstrap 95% interval over dialogues. ROUGE: mean over dialogue-reference pairs.", ""]
    body = ["## Baseline", "", *table([baseline]), "", "## MBR variants, best mean(R1, R2, RL) first", "",
            *table(mbr), "", "## Ceilings: the oracle pick per set of models (uses the references)", "",
            *table(oracles), ""]
    (args.out / f"mbr_pool_{args.label}.md").write_text("\n".join(head + body))
    print("\n".join(table([baseline]) + table(mbr[:15])[2:]))
    print(f"(all {len(mbr)} variants and the ceilings in {args.out / f'mbr_pool_{args.label}.md'})")
    bad = {n: c for n, c in mismatches.items() if c}
    if bad:
        print("error: each model alone did not give back its saved predictions: "
              + ", ".join(f"{n}: {c} of {len(pools)} differ" for n, c in bad.items())
              + " (the candidates are not the ones eval chose from)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
