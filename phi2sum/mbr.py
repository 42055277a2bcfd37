"""Minimum-Bayes-risk selection: among a dialogue's candidate summaries, keep the one that agrees most, by ROUGE,
with the evidence (the other candidates, or separate samples: generation.mbr_evidence). Every pair is scored as
matrices, with exactly rouge-score's tokenizer, counts and float operations.
"""

from __future__ import annotations

import collections
import functools
import math

import numpy as np


class _CachedStemmer:
    """rouge-score's Porter stemmer (nltk's), each distinct word stemmed once: a dialogue's 128 samples share most
    of their words, and stemming every occurrence took ~80% of MBR's selection time."""

    def __init__(self):
        from nltk.stem import porter

        self.stem = functools.lru_cache(maxsize=1 << 17)(porter.PorterStemmer().stem)


@functools.lru_cache(maxsize=1)
def _stemmer() -> _CachedStemmer:
    return _CachedStemmer()


@functools.lru_cache(maxsize=65536)  # beams and samples repeat one another
def rouge_tokens(text: str) -> tuple[str, ...]:
    """rouge-score's own tokenization (lowercase, alphanumeric runs, Porter stems of words over 3 characters)."""
    from rouge_score import tokenize

    return tuple(tokenize.tokenize(text, _stemmer()))


def _lcs_length(a: tuple, b: tuple) -> int:
    """Length of the longest common subsequence of two token sequences, bit-parallel (Allison-Dix / Hyyro):
    one row of the dynamic-programming table is the bits of one integer, so a token of `a` costs a few
    integer operations instead of len(b) Python steps. rouge-score's table gives the same length ~17x
    slower on summary-sized inputs, and MBR compares every pair of candidates."""
    masks: dict = {}
    for i, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    row = full  # a 1 bit is a column where the LCS has not grown yet
    for token in a:
        match = row & masks.get(token, 0)
        row = ((row + match) | (row - match)) & full
    return len(b) - bin(row).count("1")


def ngram_overlaps(counts: list[collections.Counter]) -> np.ndarray:
    """Shared n-grams of every pair as rouge-score counts them, the sum over n-grams of min(count in a, count in b):
    min(x, y) is the number of t >= 1 with x >= t and y >= t, so the matrix is a sum of 0/1 matrix products."""
    index: dict = {}
    cells = np.array([(i, index.setdefault(g, len(index)), c) for i, grams in enumerate(counts)
                      for g, c in grams.items()], dtype=np.int64).reshape(-1, 3)
    dense = np.zeros((len(counts), len(index) + 1), dtype=np.int64)
    dense[cells[:, 0], cells[:, 1]] = cells[:, 2]
    out = np.zeros((len(counts), len(counts)), dtype=np.float32)  # exact: integers far below 2**24
    for t in range(1, dense.max() + 1):
        hit = dense >= t
        hit = hit[:, hit.any(0)].astype(np.float32)  # past t=1 only the few n-grams some text repeats
        out += hit @ hit.T
    return out


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint64: numpy 2's bitwise_count, or the same from unpacked bytes on numpy 1.x (which
    GPU images may still carry)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.int64)
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1)
    return bits.reshape(*words.shape, 64).sum(-1, dtype=np.int64)


def lcs_lengths(seqs: list[list[int]], vocab_size: int) -> np.ndarray:
    """LCS length of every pair: _lcs_length's bit-parallel row, one numpy lane per pair. A text of up to 64
    tokens is one uint64 row and the LCS is symmetric, so each pair runs from a side that fits; pairs of two
    longer texts (rare: summaries are ~20-40 tokens) go through _lcs_length itself."""
    m = len(seqs)
    lengths = np.array([len(s) for s in seqs])
    short = np.flatnonzero(lengths <= 64)
    tokens = np.full((m, max(lengths.max(), 1)), vocab_size)  # padding: a token no text has, a step changing nothing
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    lane, position = np.nonzero(np.arange(tokens.shape[1]) < lengths[short, None])  # every token of a short text
    masks = np.zeros((vocab_size + 1, len(short)), dtype=np.uint64)  # masks[token, lane]: where b has that token
    np.bitwise_or.at(masks, (tokens[short][lane, position], lane), np.uint64(1) << position.astype(np.uint64))
    full = np.array([(1 << int(n)) - 1 for n in lengths[short]], dtype=np.uint64)
    row = np.tile(full, (m, 1))
    for column in tokens.T:
        match = row & masks[column]
        row = ((row + match) | (row - match)) & full  # a carry past bit 63 wraps away; & full drops it anyway
    out = np.zeros((m, m), dtype=np.int64)
    out[:, short] = lengths[short] - _popcount(row)
    out[short, :] = out[:, short].T
    long = np.flatnonzero(lengths > 64)
    for x, a in enumerate(long):
        for b in long[x:]:
            out[a, b] = out[b, a] = _lcs_length(tuple(seqs[a]), tuple(seqs[b]))
    return out


def pair_overlaps(tokens: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared unigrams, shared bigrams and LCS length of every pair of token sequences: with the lengths, ROUGE-1/2/L
    F1 of every pair follow exactly, for the cost of a few matrix operations instead of a Python loop per pair."""
    vocab: dict = {}
    seqs = [[vocab.setdefault(w, len(vocab)) for w in t] for t in tokens]
    return (ngram_overlaps([collections.Counter(s) for s in seqs]),
            ngram_overlaps([collections.Counter(zip(s, s[1:])) for s in seqs]), lcs_lengths(seqs, len(vocab)))


def pair_f1(lengths: np.ndarray, unigrams: np.ndarray, bigrams: np.ndarray, lcs: np.ndarray) -> np.ndarray:
    """(3, m, m): ROUGE-1, ROUGE-2 and ROUGE-L F1 of every pair (a, b) from pair_overlaps' counts and the token
    counts, with rouge-score's float operations (precision over b, recall over a; F1 is the same bits either way
    round) and its n-gram counts floored at 1 (an empty text; one word has no bigram)."""
    n = np.asarray(lengths, dtype=np.float64)
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for shared, count in ((unigrams, np.maximum(n, 1)), (bigrams, np.maximum(n - 1, 1)), (lcs, n)):
            precision, recall = shared / count[None, :], shared / count[:, None]
            out.append(np.where(shared > 0, 2 * precision * recall / (precision + recall), 0.0))
    return np.stack(out)


def mbr_pick(texts: list[str], weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
             evidence: list[str] | tuple[str, ...] | None = None) -> int:
    """Minimum-Bayes-risk choice among candidate summaries: the index of the one with the highest mbr_supports;
    ties go to the earlier candidate (the better beam; supports within 1e-9 are ties)."""
    support = mbr_supports(texts, weights, evidence)
    # Equal supports summed in different orders can differ in the last bit: within 1e-9 is a tie.
    return int(np.flatnonzero(support >= support.max() - 1e-9)[0])


def mbr_supports(texts: list[str], weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 evidence: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
    """Each candidate's summed weighted-mean ROUGE-1/2/L F1 (Porter-stemmed, eval's default; `weights` weighs the
    three, for comparing selection rules) against the evidence: all the other candidates, or with
    `evidence` (generation.mbr_evidence) those texts, every one of them (copies count; a candidate equal to an
    evidence text gets its self-score, 1 unless it is one word or empty). Texts repeat (beams rarely, samples of
    a confident model more often), so each distinct text is tokenized and compared once and weighted by its
    copies: the choice of comparing all pairs, for the cost of the distinct ones. The pairs are scored as
    matrices (pair_overlaps, pair_f1): a Python loop over 64 samples' ~2,000 pairs kept the GPU waiting for
    ~1/5 of an eval."""
    if not (len(weights) == 3 and all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0):
        raise ValueError(f"mbr_pick weights must be three finite values >= 0, not all 0; got {weights}")
    if evidence is not None and not evidence:
        raise ValueError("mbr_pick evidence must hold at least one text (or be None: the candidates)")
    pool = list(texts) + list(evidence or ())
    distinct = list(dict.fromkeys(pool))  # first-seen order
    which = {t: i for i, t in enumerate(distinct)}
    copies = np.bincount([which[t] for t in (texts if evidence is None else evidence)], minlength=len(distinct))
    tokens = [rouge_tokens(t) for t in distinct]
    r1, r2, rl = pair_f1(np.array([len(t) for t in tokens]), *pair_overlaps(tokens))
    (w1, w2, wl), total = weights, sum(weights)
    pair = (w1 * r1 + w2 * r2 + wl * rl) / total
    terms = pair * copies
    if evidence is None:
        # Each text against every other candidate: other texts times their copies, and its own other copies
        # (1 for most texts, less for one word (no bigram), 0 for an empty one).
        np.fill_diagonal(terms, (copies - 1) * pair.diagonal())
    # Summed left to right (cumsum is sequential; sum is not), in the order a loop over the pairs adds them:
    # the same floats as the pairwise mbr_pick that chose earlier evals' predictions, so those reproduce exactly.
    return np.cumsum(terms, axis=1)[:, -1][[which[t] for t in texts]]
