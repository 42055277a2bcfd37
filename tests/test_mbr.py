"""Minimum-Bayes-risk selection (phi2sum/mbr.py): every pair's ROUGE-1/2/L F1 from the matrices equals rouge-score's
to the bit, the LCS shortcuts equal rouge-score's table, and mbr_pick picks what rouge-score over every pair
picks, copies, empty texts and long texts included."""

from __future__ import annotations

import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring

from phi2sum import mbr
from phi2sum.mbr import mbr_pick

VOCAB = "Tom Mary is are late early for the meeting train bus and will call again".split()
# Weightings of ROUGE-1, -2 and -L a selection study may use (mbr_pick's `weights`).
UTILITIES = {"R1+R2+RL": (1.0, 1.0, 1.0), "R1": (1.0, 0.0, 0.0), "R2": (0.0, 1.0, 0.0), "RL": (0.0, 0.0, 1.0),
             "R2+RL": (0.0, 1.0, 1.0)}


@pytest.fixture(scope="module")
def scorer():
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


# ----------------------------------------------------------------------------------------------------
# The counts behind every pair


def test_tokens_are_rouge_scores_own(scorer):
    """MBR stems each distinct word once; the tokens must still be exactly rouge-score's (lowercase, alphanumeric
    runs, Porter stems of words over three characters), on real summaries and on awkward text."""
    import json

    from conftest import DIALOGUES, SLICE

    rows = [json.loads(line) for line in (SLICE / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = [r["summary"] for r in rows] + list(DIALOGUES) + [
        "", "   ", "A-B testing; re-running it!!", "Ünïcödé café 42nd caresses ponies", "I'm he's they're", "x" * 70]
    for text in texts:
        assert list(mbr.rouge_tokens(text)) == scorer._tokenizer.tokenize(text), text


def test_lcs_length_matches_rouge_scores_table():
    rng = np.random.default_rng(1)
    for _ in range(500):  # few distinct tokens: many repeats and many equal-length alternatives
        a, b = (tuple(rng.choice(list("abcde"), size=rng.integers(0, 20))) for _ in range(2))
        want = rouge_scorer._lcs_table(a, b)[-1][-1] if a and b else 0
        assert mbr._lcs_length(a, b) == want == mbr._lcs_length(b, a)


def test_lcs_lengths_of_every_pair_match_rouge_scores_table():
    """The LCS matrix: one uint64 lane per pair, texts of 63 to 65 tokens at the lane's edge (a carry past bit 63), and
    pairs of two longer texts through _lcs_length."""
    rng = np.random.default_rng(2)
    for _ in range(20):  # few distinct tokens, so long texts share long subsequences
        seqs = [list(rng.integers(0, 5, size=n)) for n in rng.choice([0, 1, 7, 30, 63, 64, 65, 90, 130], size=6)]
        got = mbr.lcs_lengths(seqs, 5)
        for i, a in enumerate(seqs):
            for j, b in enumerate(seqs):
                assert got[i, j] == (rouge_scorer._lcs_table(a, b)[-1][-1] if a and b else 0), (len(a), len(b))


def test_popcount_without_numpy_2_counts_the_same_bits(monkeypatch):
    words = np.random.default_rng(0).integers(0, 2**63, size=(5, 7), dtype=np.uint64) | np.uint64(1 << 63)
    want = np.array([[bin(int(w)).count("1") for w in row] for row in words])
    assert (mbr._popcount(words) == want).all()
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert (mbr._popcount(words) == want).all()


def adversarial_candidates(rng: np.random.Generator) -> list[str]:
    """Candidates that hit every special case of the matrices: copies, empty and punctuation-only texts, one
    word (no bigram), n-grams repeated within a text, and near-copies of texts around and past 64 tokens."""

    def text(low, high):
        return " ".join(rng.choice(VOCAB, size=rng.integers(low, high)))

    long = text(60, 100).split()
    near = [" ".join(long[:i] + long[i + 1 :]) for i in rng.integers(0, len(long), size=2)]  # one word dropped
    pool = [text(2, 12) for _ in range(4)] + [" ".join(long), *near, "", "...", rng.choice(VOCAB),
                                               " ".join([text(1, 3)] * rng.integers(2, 5))]
    return list(rng.choice(pool, size=rng.integers(3, 14)))


def brute_force_pick(texts: list[str], weights, score, copies_once=False, with_self=False) -> int:
    """The definition: the highest mean weighted ROUGE against all the other candidates (score(other, text) from
    rouge-score), ties to the earliest; copies_once and with_self are the two ways to get the copies wrong."""
    def utility(other, t):
        return sum(w * s.fmeasure for w, s in zip(weights, score(other, t))) / sum(weights)

    others = [list(dict.fromkeys(o for o in texts if o != t)) if copies_once else
              [o for j, o in enumerate(texts) if j != i or with_self] for i, t in enumerate(texts)]
    support = [np.mean([utility(o, t) for o in os]) if os else 0.0 for t, os in zip(texts, others)]
    return [i for i, x in enumerate(support) if x >= max(support) - 1e-9][0]


def test_pair_matrices_and_picks_match_rouge_score_on_adversarial_candidates(scorer):
    """Every pair's ROUGE-1/2/L F1 is rouge-score's to the bit, and every weighting picks what rouge-score over
    all pairs picks. The data makes copies, the self pair and long texts matter: each way of getting them
    wrong changes some picks."""
    cache: dict = {}

    def score(target, prediction):
        if (target, prediction) not in cache:
            cache[target, prediction] = tuple(scorer.score(target, prediction).values())
        return cache[target, prediction]

    def long_pairs_unscored(target, prediction):  # what a broken fallback for two texts over 64 tokens would give
        r1, r2, rl = score(target, prediction)
        lengths = map(len, map(mbr.rouge_tokens, (target, prediction)))
        return (r1, r2, scoring.Score(0, 0, 0)) if min(lengths) > 64 else (r1, r2, rl)

    rng = np.random.default_rng(3)
    wrong = {"copies_once": 0, "with_self": 0, "long_pairs": 0}
    for _ in range(40):
        texts = adversarial_candidates(rng)
        distinct = list(dict.fromkeys(texts))
        tokens = [mbr.rouge_tokens(t) for t in distinct]
        f1 = mbr.pair_f1(np.array([len(t) for t in tokens]), *mbr.pair_overlaps(tokens))
        for a, target in enumerate(distinct):
            for b, prediction in enumerate(distinct):
                assert tuple(f1[:, a, b]) == tuple(s.fmeasure for s in score(target, prediction))
        for weights in UTILITIES.values():
            want = brute_force_pick(texts, weights, score)
            assert mbr_pick(texts, weights) == want, (texts, weights)
            wrong["copies_once"] += brute_force_pick(texts, weights, score, copies_once=True) != want
            wrong["with_self"] += brute_force_pick(texts, weights, score, with_self=True) != want
            wrong["long_pairs"] += brute_force_pick(texts, weights, long_pairs_unscored) != want
    assert all(wrong.values()), wrong


# ----------------------------------------------------------------------------------------------------
# The pick


def test_mbr_pick_is_the_candidate_with_the_highest_mean_rouge_against_the_others(scorer):
    """mbr_pick's shortcuts (distinct texts once, weighted by copies; symmetric pairs) against rouge-score's
    public scorer over every pair."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        # Lengths from 0 (and punctuation only) up: an empty or one-word text scores itself below 1.
        texts = [" ".join(rng.choice(VOCAB, size=rng.integers(0, 12))) or rng.choice(["", "..."])
                 for _ in range(rng.integers(2, 7))]
        if trial % 2:  # samples repeat: draw the candidates from a few texts, copies included
            texts = list(rng.choice(texts, size=rng.integers(2, 10)))
        support = [np.mean([np.mean([v.fmeasure for v in scorer.score(o, t).values()])
                            for j, o in enumerate(texts) if j != i]) for i, t in enumerate(texts)]
        best = [i for i, x in enumerate(support) if x >= max(support) - 1e-9]  # sums in another order: ulp ties
        assert mbr_pick(texts) == best[0]
    # Copies' self-scores decide these: one word scores itself 2/3 (no bigram), an empty text 0.
    assert mbr_pick(["a", "a", "a b", "b"]) == 2
    assert mbr_pick(["", "", "a b", "a b c"]) == 2
    # An exact tie whose two sums differ in the last bit: the earlier candidate wins.
    assert mbr_pick(["and the early", "Tom", "for Tom will will will", "the call is", "Mary bus"]) == 0
    consensus = ["Tom is late for the meeting.", "Tom will be late for the meeting.",
                 "Mary calls Tom.", "Tom is late for the meeting again."]
    assert mbr_pick(consensus) == 0
    assert mbr_pick(["same words", "same words"]) == 0  # a tie keeps the better-ranked candidate


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.0, 1.0, 0.0), (0.0, 1.0, 2.0)])
def test_mbr_pick_weighs_the_three_rouges_as_asked(scorer, weights):
    rng = np.random.default_rng(1)
    for _ in range(40):
        texts = [" ".join(rng.choice(VOCAB, size=rng.integers(1, 10))) for _ in range(rng.integers(3, 7))]

        def utility(o, t):
            sc = scorer.score(o, t)
            return sum(w * sc[m].fmeasure for w, m in zip(weights, ("rouge1", "rouge2", "rougeL"))) / sum(weights)

        support = [np.mean([utility(o, t) for j, o in enumerate(texts) if j != i]) for i, t in enumerate(texts)]
        assert mbr_pick(texts, weights) == [i for i, x in enumerate(support) if x >= max(support) - 1e-9][0]
    for bad in ((0.0, 0.0, 0.0), (1.0, 1.0, -3.0), (1.0, float("nan"), 1.0)):
        with pytest.raises(ValueError, match="weights"):
            mbr_pick(["a b", "a c"], bad)


def test_mbr_pick_with_evidence_scores_every_candidate_against_every_evidence_text(scorer):
    """generation.mbr_evidence: each candidate's support is its weighted ROUGE F1 summed over all evidence texts
    (copies count, an identical text counts too), by rouge-score; ties to the earlier candidate."""
    rng = np.random.default_rng(7)
    differs = 0
    for _ in range(60):
        texts = [" ".join(rng.choice(VOCAB, size=rng.integers(1, 9))) for _ in range(rng.integers(2, 6))]
        evidence = [" ".join(rng.choice(VOCAB, size=rng.integers(1, 9))) for _ in range(rng.integers(1, 6))]
        evidence += list(rng.choice(texts, size=rng.integers(0, 3)))  # some evidence equals a candidate
        for weights in ((1.0, 1.0, 1.0), (0.0, 1.0, 0.0)):
            def support(t):
                return sum(sum(w * s.fmeasure for w, s in zip(weights, scorer.score(e, t).values())) for e in evidence)

            values = [support(t) for t in texts]
            want = next(i for i, v in enumerate(values) if v >= max(values) - 1e-9)
            assert mbr_pick(texts, weights, evidence=evidence) == want
        differs += mbr_pick(texts, evidence=evidence) != mbr_pick(texts)
    assert differs > 5  # the evidence, not the candidates, decided
    with pytest.raises(ValueError, match="at least one text"):
        mbr_pick(["a", "b"], evidence=[])
