"""Generation as eval and summarize run it (phi2sum/generate.py): batches planned by length and token budget,
left padding that changes no row's output, each summary cut at its stop token, run-ons flagged, a batch that
runs out of GPU memory halved, MBR's candidates chosen among. Random tiny models for padding checks, scripted
ones (conftest.scripted_lm) to place stop tokens and run-ons exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import DIALOGUES, EOS, INSTRUCTION, TOM_IS_LATE, chain, cpu, scripted_lm, tiny_config_dict
from phi2sum import data as data_mod
from phi2sum import generate, modeling
from phi2sum.config import GenerationConfig, Phi2sumError, RunConfig
from phi2sum.generate import Loaded, clean_summary, plan_batches
from phi2sum.mbr import mbr_pick


def run(loaded, gen: GenerationConfig, dialogues=DIALOGUES):
    return generate.generate(loaded, dialogues, INSTRUCTION, gen)


# ----------------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("lm", ["random_lm", "random_chat_lm"])
def test_batched_generation_equals_one_at_a_time(lm, request):
    """Left padding and the attention mask leave each row's greedy output exactly as if it ran alone."""
    loaded = request.getfixturevalue(lm)
    batched = run(loaded, GenerationConfig(max_new_tokens=10, batch_size=4))
    alone = run(loaded, GenerationConfig(max_new_tokens=10, batch_size=1))
    assert [g.raw for g in batched] == [g.raw for g in alone]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in alone]
    for g in batched:
        assert "Instruct:" not in g.raw and "#Person1#: " not in g.raw and "<|im_start|>" not in g.raw


def test_batches_group_prompts_of_similar_length(random_lm):
    widths = []

    class Recorder:  # the real model, with the padded batch widths noted on the way
        def generate(self, input_ids, **kwargs):
            widths.append(input_ids.shape[1])
            return random_lm.model.generate(input_ids=input_ids, **kwargs)

    loaded = Loaded(Recorder(), random_lm.tokenizer, random_lm.fmt, random_lm.stop_ids, None, random_lm.hardware)
    short, long = DIALOGUES[0], DIALOGUES[1]
    gens = run(loaded, GenerationConfig(max_new_tokens=2, batch_size=2), [short, long, short, long])
    lengths = {d: len(data_mod.fit_prompt(random_lm.tokenizer, d, "plain", INSTRUCTION, 896)[0]) for d in (short, long)}
    assert widths == [lengths[long], lengths[short]]  # the long pair first, the short pair unpadded
    assert gens[0].raw == gens[2].raw and gens[1].raw == gens[3].raw  # results come back in input order


def test_token_budget_puts_long_prompts_in_smaller_batches(random_lm):
    """batch_tokens caps rows x sequences x (longest prompt + max_new_tokens); results do not depend on the split."""
    gen = GenerationConfig(max_new_tokens=4, batch_size=8)
    lengths = [100, 90, 40, 30, 30, 20, 10]
    order = list(range(len(lengths)))
    assert plan_batches(lengths, order, gen) == [order]
    capped = gen.model_copy(update={"batch_tokens": 208})
    # 208 // 104 = 2 rows of the longest; then 208 // 44 = 4 rows; the last one alone
    assert plan_batches(lengths, order, capped) == [[0, 1], [2, 3, 4, 5], [6]]
    beams = capped.model_copy(update={"num_beams": 2})  # each row keeps 2 beams' caches: half the rows
    assert plan_batches(lengths, order, beams) == [[0], [1], [2, 3], [4, 5, 6]]
    mbr = capped.model_copy(update={"do_sample": True, "mbr_candidates": 2})  # MBR's samples count as beams do
    assert plan_batches(lengths, order, mbr) == plan_batches(lengths, order, beams)
    one = gen.model_copy(update={"batch_tokens": 1})  # never less than one row
    assert plan_batches(lengths, order, one) == [[i] for i in order]
    budget = run(random_lm, GenerationConfig(max_new_tokens=10, batch_size=4, batch_tokens=150))
    plain = run(random_lm, GenerationConfig(max_new_tokens=10, batch_size=4))
    assert [g.raw for g in budget] == [g.raw for g in plain]


def test_a_batch_that_does_not_fit_the_gpu_is_halved_and_the_eval_finishes(random_lm, capsys):
    """A card smaller than the config assumed: batches over 2 rows run out of memory. The batch is halved
    (with a warning), later batches keep the size that fitted, and the summaries are the same."""
    attempts = []

    class Small:  # the real model, on a card that holds 2 rows at most
        def generate(self, input_ids, **kwargs):
            attempts.append(input_ids.shape[0])
            if input_ids.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
            return random_lm.model.generate(input_ids=input_ids, **kwargs)

    loaded = Loaded(Small(), random_lm.tokenizer, random_lm.fmt, random_lm.stop_ids, None, random_lm.hardware)
    gen = GenerationConfig(max_new_tokens=6, batch_size=5)
    fitted = run(loaded, gen)
    plain = run(random_lm, gen)
    assert [g.raw for g in fitted] == [g.raw for g in plain]
    assert attempts == [5, 3, 2, 1, 2]  # 5 fails, its first 3 fail, then at most 2 per batch: 2 + 1, 2
    err = capsys.readouterr().err
    assert err.count("out of GPU memory") == 2 and "at most 2 per batch" in err


def test_one_dialogue_that_does_not_fit_is_one_clear_error(random_lm):
    class Full:
        def generate(self, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    loaded = Loaded(Full(), random_lm.tokenizer, random_lm.fmt, random_lm.stop_ids, None, random_lm.hardware)
    with pytest.raises(Phi2sumError, match="one dialogue of .* lower generation.max_input_tokens"):
        run(loaded, GenerationConfig(max_new_tokens=10), DIALOGUES[:1])


def test_each_batch_is_handed_on_as_it_finishes(random_lm):
    """on_batch (summarize's streaming --out, eval's progress) sees every dialogue once, with its result."""
    seen = []
    gens = generate.generate(random_lm, DIALOGUES, INSTRUCTION, GenerationConfig(max_new_tokens=3, batch_size=2),
                             on_batch=seen.append)
    assert [len(b) for b in seen] == [2, 2, 1]
    assert sorted(i for b in seen for i, _ in b) == list(range(len(DIALOGUES)))
    assert all(gens[i] is g for b in seen for i, g in b)


def test_long_dialogues_are_shortened_to_max_input_tokens(random_lm):
    gens = run(random_lm, GenerationConfig(max_new_tokens=2, max_input_tokens=64), DIALOGUES[:2])
    assert [g.truncated_input for g in gens] == [False, True]


# ----------------------------------------------------------------------------------------------------
# Where a summary ends


def test_output_is_the_summary_alone_and_stops_at_the_stop_token(tiny_model):
    loaded = scripted_lm(tiny_model, chain(*TOM_IS_LATE, EOS))
    for g in run(loaded, GenerationConfig(max_new_tokens=12, batch_size=2)):
        assert (g.text, g.raw, g.new_tokens, g.hit_max, g.run_on) == ("Tom is late.", "Tom is late.", 6, False, False)


def test_hit_max_when_no_stop_token_comes(tiny_model):
    loaded = scripted_lm(tiny_model, chain(*TOM_IS_LATE, EOS))
    [g] = run(loaded, GenerationConfig(max_new_tokens=3), DIALOGUES[:1])
    assert (g.text, g.new_tokens, g.hit_max) == ("Tom is", 3, True)


def test_rows_that_stop_early_are_cut_at_their_stop_token(tiny_model):
    """After "Tom" the script ties between " is late." + stop and an endless " ok ok": sampled rows
    take either branch within one batch; each is cut at its own stop token or runs to max_new_tokens."""
    script = chain(*TOM_IS_LATE, EOS) | {"om": ["Ġis", "Ġo"], "Ġo": ["k"], "k": ["Ġo"]}
    loaded = scripted_lm(tiny_model, script)
    gens = run(loaded, GenerationConfig(max_new_tokens=10, batch_size=16, do_sample=True), DIALOGUES[:2] * 8)
    outcomes = {(g.text, g.new_tokens, g.hit_max) for g in gens}
    assert outcomes == {("Tom is late.", 6, False), ("Tom ok ok ok ok", 10, True)}


def test_chat_model_stops_at_its_end_of_turn_token_not_eos(tiny_chat_model):
    """The chat template ends turns with <|im_end|> (not EOS); text scripted after it is never shown."""
    loaded = scripted_lm(tiny_chat_model, chain(*TOM_IS_LATE, "<|im_end|>", "Ġo", "k"), fmt="chat")
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.stop_ids)[0] == "<|im_end|>"
    [g] = run(loaded, GenerationConfig(max_new_tokens=12), DIALOGUES[:1])
    assert (g.text, g.raw, g.new_tokens, g.hit_max) == ("Tom is late.", "Tom is late.", 6, False)


def test_run_on_into_a_new_turn_is_cut_and_flagged(tiny_model):
    turn = "\n#Person2#:"  # one added token: the script needs a newline token other than the prompt's last
    loaded = scripted_lm(tiny_model, chain(*TOM_IS_LATE, turn, "Ġo", "k", EOS), new_tokens=(turn,))
    [g] = run(loaded, GenerationConfig(max_new_tokens=20), DIALOGUES[:1])
    assert (g.text, g.raw, g.run_on, g.hit_max) == ("Tom is late.", "Tom is late.\n#Person2#: ok", True, False)


@pytest.mark.parametrize("raw,text,run_on", [
    ("Tom is late.", "Tom is late.", False),
    (" #Person1# tells #Person2# about it. ", "#Person1# tells #Person2# about it.", False),
    ("Tom is late.\n#Person2#: ok, see you", "Tom is late.", True),
    ("Tom is late.\n  #Person1#: hm", "Tom is late.", True),
    ("Tom is late.\nPerson2: ok", "Tom is late.", True),
    ("Tom is late.\nInstruct: Summarize", "Tom is late.", True),
    ("Tom is late.\n<|im_start|>user", "Tom is late.", True),
    ("Tom is late.\nHe left.", "Tom is late.\nHe left.", False),
    ("Tom says #Person2#: is late", "Tom says #Person2#: is late", False),  # not a new line: not a turn
    ("#Person1#: hi", "#Person1#: hi", True),  # nothing before the turn: kept, but flagged
])
def test_clean_summary(raw, text, run_on):
    assert clean_summary(raw) == (text, run_on)


# ----------------------------------------------------------------------------------------------------
# Decoding settings


def test_beam_search_and_sampling_work(tiny_model, random_lm):
    loaded = scripted_lm(tiny_model, chain(*TOM_IS_LATE, EOS))
    for gen in (GenerationConfig(num_beams=2, max_new_tokens=12),
                GenerationConfig(num_beams=3, length_penalty=0.5, max_new_tokens=12),
                GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=12)):
        assert {(g.text, g.hit_max) for g in run(loaded, gen)} == {("Tom is late.", False)}, gen
    # On a random model: beams/sampling run batched, stay within max_new_tokens, and sampling is seeded.
    beams = run(random_lm, GenerationConfig(num_beams=2, max_new_tokens=6))
    assert all(0 < g.new_tokens <= 6 for g in beams)
    sampled = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed + 100)  # generation.seed decides, not whatever the global RNG was
        sampled.append([g.raw for g in run(random_lm, GenerationConfig(do_sample=True, max_new_tokens=6, seed=seed))])
    assert sampled[0] == sampled[1] != sampled[2]


def test_repetition_penalty_is_applied(tiny_model):
    # " ok" repeats forever; with a penalty the repeated " o" falls below " do" (bias 5), which ends it.
    loaded = scripted_lm(tiny_model, {"Ċ": ["Ġo"], "Ġo": ["k"], "k": ["Ġo"], "Ġdo": [EOS]}, bias={"Ġdo": 5.0})
    [plain] = run(loaded, GenerationConfig(max_new_tokens=6), DIALOGUES[:1])
    [penalized] = run(loaded, GenerationConfig(max_new_tokens=6, repetition_penalty=10.0), DIALOGUES[:1])
    assert (plain.text, plain.hit_max) == ("ok ok ok", True)
    assert (penalized.text, penalized.hit_max) == ("ok do", False)


# ----------------------------------------------------------------------------------------------------
# Minimum-Bayes-risk generation (the selection rule itself: test_mbr.py)


@pytest.mark.parametrize("sample", [False, True])
def test_mbr_generation_returns_the_consensus_candidate(random_lm, sample):
    """With mbr_candidates, each dialogue's summary is the candidate mbr_pick chooses among the N that
    transformers' generate returns for it (beams, or seeded samples), batched as usual."""
    n = 4
    gen = GenerationConfig(max_new_tokens=8, mbr_candidates=n, batch_size=3, do_sample=sample, temperature=1.5)
    state = torch.random.get_rng_state()
    picked = run(random_lm, gen)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    torch.manual_seed(gen.seed)  # generate seeds sampling: the same batches in the same order draw the same samples
    every = [data_mod.fit_prompt(random_lm.tokenizer, d, random_lm.fmt, INSTRUCTION, gen.max_input_tokens)[0]
             for d in DIALOGUES]
    order = sorted(range(len(DIALOGUES)), key=lambda i: -len(every[i]))
    want = {}
    for idx in plan_batches([0] * len(order), order, gen):
        prompts = [every[i] for i in idx]
        for i, prompt, candidates in zip(idx, prompts, generate._generate_padded(random_lm, prompts, gen)):
            assert len(candidates) == n
            assert all(logprob is None for _, logprob in candidates)  # generate decoded these
            candidates = [c for c, _ in candidates]
            texts = [generate._finish(random_lm, c, False).text for c in candidates]
            want[i] = texts[mbr_pick(texts)]
            assert picked[i].candidates == tuple(texts)  # every candidate kept, in generation order
            if not sample:  # distinct beams, and each prompt's own: the same as decoding that prompt alone
                assert len(set(map(tuple, candidates))) == n
                alone = random_lm.model.generate(torch.tensor([prompt]), num_beams=n, num_return_sequences=n,
                                                 max_new_tokens=8, do_sample=False, eos_token_id=random_lm.stop_ids,
                                                 pad_token_id=random_lm.tokenizer.pad_token_id)
                assert [row[len(prompt):] for row in alone.tolist()] == candidates
    assert [g.text for g in picked] == [want[i] for i in range(len(DIALOGUES))]
    if sample:
        assert len({g.text for g in picked}) > 1


def test_mbr_evidence_is_sampled_at_its_own_temperature(random_lm, monkeypatch):
    """Candidates at generation.temperature, evidence (mbr_evidence samples) at mbr_evidence_temperature, same
    batches, and only the candidates' log-probabilities asked for (the evidence's are never read); each summary is
    mbr_pick's choice of its candidates against its evidence."""
    seen = []
    real = generate._generate_padded

    def spy(loaded, prompts, gen, logprobs=True):
        seen.append((len(prompts), gen.temperature, gen.mbr_candidates, logprobs))
        return real(loaded, prompts, gen, logprobs)

    monkeypatch.setattr(generate, "_generate_padded", spy)
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.5, mbr_candidates=4, mbr_evidence=3,
                           mbr_evidence_temperature=1.5, batch_size=3)
    out = run(random_lm, gen)
    assert seen[:2] == [(3, 0.5, 4, True), (3, 1.5, 3, False)] and len(seen) == 2 * -(-len(DIALOGUES) // 3)
    for g in out:
        assert len(g.candidates) == 4 and len(g.evidence) == 3
        assert g.text == g.candidates[mbr_pick(list(g.candidates), evidence=g.evidence)]
    assert GenerationConfig(mbr_candidates=4, mbr_evidence=8).sequences_per_dialogue == 8  # batches fit either


# ----------------------------------------------------------------------------------------------------
# The model for inference


def test_generation_uses_its_own_device_and_precision_not_trainings(tiny_model, tmp_path, monkeypatch):
    """generation.device/precision decide where eval and summarize run; train.device/precision do not."""
    asked = []
    real = modeling.pick_hardware

    def spy(device, precision):
        asked.append((device, precision))
        return real("cpu", "fp32")

    monkeypatch.setattr(modeling, "pick_hardware", spy)
    cfg = RunConfig.model_validate(tiny_config_dict(tiny_model, tmp_path, train={"device": "cuda", "precision": "fp16"},
                                                    generation={"device": "cpu", "precision": "bf16"}))
    loaded = generate.load_for_inference(cfg, None)
    assert asked == [("cpu", "bf16")] and loaded.hardware.device.type == "cpu"


def test_pick_hardware_follows_device_and_precision(monkeypatch):
    assert modeling.pick_hardware("auto", "auto") == cpu()  # no GPU here: the CPU, in fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100")
    assert modeling.pick_hardware("cpu", "bf16") == cpu()  # asked for the CPU: the GPU is not used
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    hw = modeling.pick_hardware("auto", "auto")
    assert (hw.device, hw.dtype, hw.name) == (torch.device("cuda", 0), torch.float16, "Tesla P100")
    assert modeling.pick_hardware("cuda", "fp32").dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert modeling.pick_hardware("auto", "auto").dtype == torch.bfloat16
    monkeypatch.setenv("LOCAL_RANK", "1")  # one GPU per process under accelerate launch / torchrun
    assert modeling.pick_hardware("auto", "fp16").device == torch.device("cuda", 1)


def test_folding_the_adapter_changes_no_summary(trained_run, tiny_model, tmp_path):
    """fold_adapter merges LoRA into an unquantized base for speed: the same summaries as the adapter beside
    it (fp32 here), and nothing to fold without an adapter."""
    cfg = RunConfig.model_validate(tiny_config_dict(tiny_model, tmp_path))
    loaded = generate.load_for_inference(cfg, str(trained_run))
    gen = GenerationConfig(max_new_tokens=8)
    beside = run(loaded, gen)
    assert generate.fold_adapter(loaded)
    assert [g.raw for g in run(loaded, gen)] == [g.raw for g in beside]
    assert not generate.fold_adapter(generate.load_for_inference(cfg, None))
