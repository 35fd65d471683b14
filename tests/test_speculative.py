"""Lossless (self-speculative) generation: greedy output equal to the full model's token for token on
tiny Llama/OPT models and on the embedded model, sampled output distributed as the full model's,
and the round statistics."""

import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from conftest import make_tiny, poison
from greencode.config import GenerationConfig, SpeculativeConfig
from greencode.gates import ConfidenceGate, FixedGate, FullGate, PolicyGate
from greencode.generate import GatedGenerator
from greencode.modeling import model_fingerprint
from greencode.policy import ExitPolicy
from greencode.sampling import pick_tokens
from greencode.speculative import (
    LosslessGenerator,
    SpeculativeStats,
    accept_or_resample,
    draft_length,
    sampling_probs,
)

PROMPTS = [[5, 17, 30, 42, 8, 99], [9, 100, 3], [77, 12, 400, 5, 6, 7, 8, 9, 10]]
N_NEW = 16
# keeps drafting (every round exercises draft and verification); greedy drafts over a shortlist of a quarter of
# the tiny vocabulary plus the prompt's tokens, so some drafts fall outside it and are rejected
SPEC = SpeculativeConfig(min_draft=1, max_draft=4, shortlist=128)
GREEDY = GenerationConfig(max_new_tokens=N_NEW, lossless=True, speculative=SPEC)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: tiny models run fastest on one, and two stall each other on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def final_norm(lm):
    return lm.model.model.norm if lm.model.config.model_type == "llama" else lm.model.model.decoder.final_layer_norm


def tiny(arch, vocab_size=512, logit_scale=30.0, **kwargs):
    """A tiny random model whose early exits disagree with its last layer now and then.

    Scaled-up decoder weights make deeper layers change the prediction (so drafts get rejected);
    a sharpened final norm peaks the next-token distributions (so the confidence gate exits at
    mixed depths). Both leave it an ordinary Hugging Face model.
    """
    lm = make_tiny(arch, vocab_size=vocab_size, **kwargs)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_(1.5)
        for p in final_norm(lm).parameters():
            p.mul_(logit_scale)
    lm.fingerprint = model_fingerprint(lm.model)
    return lm


def hf_greedy(lm, prompt, n=N_NEW):
    out = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def coin_policy(lm, seed=0):
    """A linear random policy: p[exit] swings with the hidden state, so tokens exit at mixed depths."""
    torch.manual_seed(seed)
    policy = ExitPolicy(lm.hidden_size, hidden_sizes=[], exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    with torch.no_grad():
        policy.net[0].weight.mul_(20.0)
    return policy


def constant_policy(lm, exit: bool):
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    with torch.no_grad():
        policy.net[-1].bias.copy_(torch.tensor([-10.0, 10.0] if exit else [10.0, -10.0]))
    return policy


GATES = {
    "fixed-first": lambda lm: FixedGate(lm.exit_points[0]),
    "fixed-deep": lambda lm: FixedGate(lm.exit_points[-1]),
    "confidence": lambda lm: ConfidenceGate(0.8),
    "policy": lambda lm: PolicyGate(coin_policy(lm), 0.5),
    "policy-always-exits": lambda lm: PolicyGate(constant_policy(lm, exit=True), 0.5),
    "policy-never-exits": lambda lm: PolicyGate(constant_policy(lm, exit=False), 0.5),
    "full": lambda lm: FullGate(),
}
MIXED = ("fixed-first", "fixed-deep", "confidence", "policy")  # drafts both accepted and rejected on `tiny`


@pytest.fixture(scope="module", params=["llama", "opt"])
def lm(request):
    return tiny(request.param)


@pytest.fixture(scope="module")
def references(lm):
    return [hf_greedy(lm, p) for p in PROMPTS]


def totals(results, key):
    return sum(r.speculative[key] for r in results)


def start(gen, prompt, cfg=GREEDY):
    """One row after its prompt pass: (its decoding state, the logits of its first token [1, V])."""
    pre = gen.prefill([prompt], False)
    return gen.row_state(pre, 0, prompt, cfg), pre.output.logits


@pytest.mark.parametrize("gate_name", list(GATES))
def test_greedy_equals_hf_generate(lm, references, gate_name):
    results = LosslessGenerator(lm).generate(PROMPTS, GATES[gate_name](lm), GREEDY)
    assert [r.token_ids for r in results] == references
    if gate_name in MIXED:  # both the accept and the reject/crop paths were taken
        assert 0 < totals(results, "accepted_tokens") < totals(results, "drafted_tokens")


def test_policy_drafts_exit_at_mixed_depths(lm):
    results = LosslessGenerator(lm).generate(PROMPTS, GATES["policy"](lm), GREEDY)
    depths = {r.speculative["mean_draft_depth"] for r in results}
    assert depths - set(lm.exit_points), f"every row drafted at one depth: {depths}"


def test_policy_that_never_exits_is_the_plain_full_model(lm):
    results = LosslessGenerator(lm).generate(PROMPTS, GATES["policy-never-exits"](lm), GREEDY)
    L = lm.num_layers
    for r in results:
        assert r.speculative["drafted_tokens"] == 0 and r.speculative["rounds"] == N_NEW - 1
        assert r.layers_per_token == [L] * N_NEW and r.speculative["layer_passes"] == L * N_NEW


def test_policy_that_always_exits_drafts_like_the_first_exit_point(lm):
    gen = LosslessGenerator(lm)
    always = gen.generate(PROMPTS, GATES["policy-always-exits"](lm), GREEDY)
    fixed = gen.generate(PROMPTS, GATES["fixed-first"](lm), GREEDY)
    def untimed(r):
        return {k: v for k, v in r.speculative.items() if not k.endswith("time_s")}
    assert [untimed(r) for r in always] == [untimed(r) for r in fixed]
    assert {r.speculative["mean_draft_depth"] for r in always} == {lm.exit_points[0]}


def test_fixed_gate_layer_accounting_is_layerskips(lm):
    """Fixed k: a round of d drafts computes d*k draft layers + d*(L-k) + L verification layers
    (the last draft enters at the embedding), in d*k + L sequential layer calls."""
    k, L = lm.exit_points[1], lm.num_layers
    for r in LosslessGenerator(lm).generate(PROMPTS, FixedGate(k), GREEDY):
        s = r.speculative
        assert s["mean_draft_depth"] == k
        assert sum(r.layers_per_token) == s["layers_computed"] == L * (1 + s["drafted_tokens"] + s["rounds"])
        assert s["layer_passes"] == L + k * s["drafted_tokens"] + L * s["rounds"]
        assert r.mean_layers == pytest.approx(s["layers_computed"] / N_NEW)


def test_cache_holds_the_full_models_kv(lm):
    """After rounds with rejections the kept cache is the full model's, at every layer."""
    from transformers import DynamicCache

    gen = LosslessGenerator(lm)
    gate, stats = GATES["policy"](lm), SpeculativeStats()
    for prompt in PROMPTS:
        seq, logits = start(gen, prompt)
        tokens = [int(logits.argmax())]
        while len(tokens) < N_NEW:
            out = gen.round(seq, tokens[-1], gate, 4, GREEDY, None, stats).tokens
            tokens += out
        assert seq.length == len(prompt) + len(tokens) - 1  # the last token is not fed yet
        ref = DynamicCache(config=lm.model.config)
        with torch.no_grad():
            lm.model(torch.tensor([prompt + tokens[:-1]]), past_key_values=ref, use_cache=True)
        for ours, full in zip(seq.cache.layers, ref.layers):
            torch.testing.assert_close(ours.keys, full.keys, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.values, full.values, rtol=1e-4, atol=1e-4)
    assert 0 < stats.accepted < stats.drafted


def test_draft_length_maximises_expected_tokens_per_work():
    cfg = SpeculativeConfig(min_draft=0, max_draft=8)
    def length(a, min_draft=0):
        return draft_length(a, 12, 30, 8.0, cfg.model_copy(update={"min_draft": min_draft}))
    # depth 12 of 30 layers, LM head = 8 layers: one draft pays off once (1 + a) / 58 > 1 / 38, i.e. a > 0.53
    assert length(0.5) == 0 and length(0.55) == 1
    assert length(0.8) == 2  # 2.44 tokens / 78 beats 1.8 / 58 and 2.95 / 98
    assert length(1.0) == 8 and length(0.0, min_draft=1) == 1
    lengths = [length(a / 20) for a in range(21)]
    assert lengths == sorted(lengths)


def test_each_row_adapts_its_draft_length(lm):
    """After a round with drafts a row's acceptance rate moves toward the round's (a running mean);
    after one without, back toward the initial guess; its next draft length follows, down to 0."""
    spec = SpeculativeConfig(max_draft=4)
    cfg = GREEDY.model_copy(update={"speculative": spec})
    gen = LosslessGenerator(lm)
    gate = FixedGate(lm.exit_points[0])
    budgets = []
    for prompt in PROMPTS:
        seq, logits = start(gen, prompt, cfg)
        token = int(logits.argmax())
        for _ in range(6):
            before, stats = seq.acceptance, SpeculativeStats()
            budgets.append(gen.budget(seq, gate, N_NEW, spec))
            out = gen.round(seq, token, gate, budgets[-1], cfg, None, stats).tokens
            token = out[-1]
            assert stats.drafted == budgets[-1] and stats.accepted == len(out) - 1
            if stats.drafted:
                rate = stats.accepted / stats.drafted
                decay = spec.acceptance_decay
                assert seq.acceptance == pytest.approx(decay * before + (1 - decay) * rate)
                assert seq.depth == lm.exit_points[0]
            else:
                assert seq.acceptance == pytest.approx(before + spec.recovery * (spec.initial_acceptance - before))
    assert budgets[0] > 0 and 0 in budgets and max(budgets[budgets.index(0):]) > 0  # stops, then tries again


def test_config_and_input_errors_name_the_field(lm):
    with pytest.raises(ValidationError, match="min_draft"):
        SpeculativeConfig(min_draft=5, max_draft=2)
    with pytest.raises(ValidationError, match="recovery"):
        SpeculativeConfig(recovery=1.5)
    gen = LosslessGenerator(lm)
    with pytest.raises(ValueError, match="generation.kv_mode"):
        gen.generate(PROMPTS[:1], FullGate(), GREEDY.model_copy(update={"kv_mode": "none"}))
    with pytest.raises(ValidationError, match="kv_mode"):
        GenerationConfig(lossless=True, kv_mode="none")
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], FullGate(), GREEDY)


def test_prefix_cache_serves_and_stores_lossless_requests(lm):
    """The prompt pass reuses stored K/V, and a finished row stores its prompt + completion (all exact)."""
    from greencode.prefix_cache import PrefixCache

    store = PrefixCache(1 << 24, lm.fingerprint)
    gen, gate = LosslessGenerator(lm, prefix_cache=store), FixedGate(lm.exit_points[0])
    [first] = gen.generate([PROMPTS[0]], gate, GREEDY)
    assert first.cached_prompt_tokens == 0
    follow = PROMPTS[0] + first.token_ids[:6]  # the next keystroke: the prompt plus part of the completion
    [again] = gen.generate([follow], gate, GREEDY)
    # type-along (issue 22): the rest of the stored completion is served, its K/V carry the prompt pass on
    assert (again.cached_prompt_tokens, again.cached_completion_tokens) == (len(follow), N_NEW - 6)
    assert again.token_ids == hf_greedy(lm, follow)
    other = PROMPTS[0] + [(first.token_ids[0] + 1) % 500]  # a keystroke off the suggestion: ordinary prefix reuse
    [off] = gen.generate([other], gate, GREEDY)
    assert (off.cached_prompt_tokens, off.cached_completion_tokens) == (len(other) - 1, 0)
    assert off.token_ids == hf_greedy(lm, other)


def test_stop_eos_and_stream_match_the_full_generator(lm, tokenizer):
    """Lossless results (text, tokens, finish reason) are the plain full generator's, stops included."""
    lm.tokenizer = tokenizer  # decode only: the prompts are token ids below the tiny vocab
    try:
        lossless, full = LosslessGenerator(lm), GatedGenerator(lm)
        gate = GATES["policy"](lm)
        free = full.generate(PROMPTS[:1], FullGate(), GREEDY)[0]
        cases = [GREEDY, GREEDY.model_copy(update={"stop": [free.text[3:6]]})]
        for cfg in cases:
            *ref_steps, ref_end = full.stream(PROMPTS[:1], FullGate(), cfg.model_copy(update={"lossless": False}))
            *steps, end = lossless.stream(PROMPTS[:1], gate, cfg)
            [ref], [got] = ref_end.results, end.results
            ref_events, events = [e for s in ref_steps for e in s], [e for s in steps for e in s]
            assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
            def same(e):
                return (e.token_id, e.text, e.finish_reason)
            assert [same(e) for e in events] == [same(e) for e in ref_events]
        assert got.finish_reason == "stop_sequence"
        lossless.eos_ids = full.eos_ids = {free.token_ids[5]}
        ref, got = full.generate(PROMPTS[:1], FullGate(), GREEDY)[0], lossless.generate(PROMPTS[:1], gate, GREEDY)[0]
        assert got.finish_reason == ref.finish_reason == "eos_token" and got.token_ids == ref.token_ids
    finally:
        lm.tokenizer = None


def test_result_reports_stats_time_and_unmeasured_energy(lm):
    gen = LosslessGenerator(lm)
    result = gen.generate(PROMPTS[:1], GATES["policy"](lm), GREEDY)[0]
    res = result.to_dict()
    assert res["time_s"] > 0 and res["generated_tokens"] == N_NEW and "energy_j" in res
    spec = res["speculative"]
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert res["mean_layers"] == pytest.approx(spec["layers_computed"] / N_NEW)
    # every emitted token costs at least the L layers of its position (draft + verification), never less
    assert min(result.layers_per_token) >= lm.num_layers
    assert spec["layer_passes"] < spec["layers_computed"]  # verification shares passes over tokens
    for n in (1, 2):  # the prompt pass alone; one full-depth round with no room to draft
        short = gen.generate(PROMPTS[:1], GATES["policy"](lm), GREEDY.model_copy(update={"max_new_tokens": n}))[0]
        assert short.token_ids == hf_greedy(lm, PROMPTS[0], n)


# --------------------------------------------------------------------------- sampling


def test_sampling_probs_is_what_the_generator_samples_from():
    """``sampling_probs`` is pick_tokens' distribution: the same draws for the same seed, normalised and
    finite, also at the rule's edges (a temperature below the greedy limit, a top-p under the top token's
    probability, a row holding NaN, one holding inf)."""
    logits = torch.randn(64, 50) * 3
    logits[5, 7], logits[9, 3] = float("nan"), float("inf")
    for temperature, top_p in ((0.7, 0.8), (1.0, 1e-300), (1e-6, 0.9), (2.0, 1.0)):
        picked = pick_tokens(logits, temperature, top_p, torch.Generator().manual_seed(0))
        probs = sampling_probs(logits, temperature, top_p)
        ours = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0)).squeeze(-1)
        assert picked.tokens.tolist() == ours.tolist(), (temperature, top_p)
        assert bool(torch.isfinite(probs).all()) and torch.allclose(probs.sum(-1), torch.ones(64))


@pytest.mark.parametrize("gate_name", ["fixed-first", "full"])  # the break found by a verification / at full depth
def test_a_row_whose_logits_break_fails_alone(gate_name):
    """Non-finite logits end only their row, with finish_reason 'error' after the tokens before them: at the
    first token (a NaN in the prompt) and later (its first token fed back); the other rows stay exact."""
    lm = tiny("llama")
    gen, gate = LosslessGenerator(lm), GATES[gate_name](lm)
    free = gen.generate(PROMPTS, gate, GREEDY)
    said = free[0].token_ids[0]
    assert all(said not in r.token_ids + p for r, p in zip(free[1:], PROMPTS[1:])) and said not in PROMPTS[0]
    poison(lm, said)  # row 0 breaks once its first token is fed back
    poison(lm, PROMPTS[2][2])  # row 2 from its prompt pass on
    *steps, finished = gen.stream(PROMPTS, gate, GREEDY)
    failed = [e for events in steps for e in events if e.finish_reason == "error"]
    assert [(e.row, e.token_id) for e in failed] == [(0, None), (2, None)] and "non-finite" in failed[0].error
    broken, fine, broken_prompt = finished.results
    assert broken.finish_reason == "error" and broken.token_ids == [said] and broken.error == failed[0].error
    assert broken_prompt.finish_reason == "error" and broken_prompt.token_ids == []
    assert fine.token_ids == free[1].token_ids and fine.error is None
    sampled = gen.generate(PROMPTS, gate, GREEDY.model_copy(update={"temperature": 0.7, "seed": 1}))
    assert sampled[2].finish_reason == "error"  # no raise, no NaN draw


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / 2)


def test_accept_or_resample_keeps_the_target_distribution():
    """Draft ~ q, then accept/resample: the emitted token is distributed as p, even where q covers
    tokens p excludes and p tokens q never proposes. 20k draws: sampling noise TV ~0.006."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0])
    q = torch.tensor([0.1, 0.1, 0.0, 0.4, 0.4])
    rng = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    drafts = torch.multinomial(q, 20_000, replacement=True, generator=rng).tolist()
    for d in drafts:
        resampled = accept_or_resample(p, q, d, rng)
        counts[d if resampled is None else resampled] += 1
    assert tv(counts / counts.sum(), p) < 0.02 < tv(q, p)


def test_sampled_tokens_follow_the_full_model():
    """The next two tokens after a fixed context, sampled by lossless rounds (policy drafts, which the gate
    sometimes declines; temperature 1, top-p 0.9), against the full model's exact marginals from plain
    Hugging Face forwards. 300 samples over 8 tokens: sampling noise alone stays under TV 0.08 (99th
    percentile); the tolerance is 0.1. The first token's draft comes from the exit at layer 1, whose
    distribution is >= 0.5 off the full model's, so a sampler that kept drafts unchecked (or mixed them
    in) fails."""
    lm = tiny("llama", vocab_size=8, logit_scale=8.0, num_layers=2, hidden=32, exit_points=[1], seed=1)
    gate, n, vocab, prompt, first = PolicyGate(coin_policy(lm, seed=1), 0.5), 300, 8, [1, 2, 3], 4
    cfg = GenerationConfig(temperature=1.0, top_p=0.9, lossless=True, speculative=SpeculativeConfig(max_draft=2))
    gen = LosslessGenerator(lm)
    rng, stats = torch.Generator().manual_seed(0), SpeculativeStats()
    seq, _ = start(gen, prompt, cfg)
    samples = []
    for _ in range(n):
        out = gen.round(seq, first, gate, 2, cfg, rng, stats).tokens
        if len(out) < 2:
            out += gen.round(seq, out[-1], gate, 2, cfg, rng, stats).tokens
        samples.append(out[:2])
        gen.truncate(seq, len(prompt))  # back to the context for the next sample
    assert 0 < stats.accepted < stats.drafted
    with torch.no_grad():
        p1 = sampling_probs(lm.model(torch.tensor([prompt + [first]])).logits[0, -1], 1.0, 0.9)
        p2 = sampling_probs(lm.model(torch.tensor([prompt + [first, t] for t in range(vocab)])).logits[:, -1], 1.0, 0.9)
        exit_state = lm.forward_exits(torch.tensor([prompt + [first]])).hidden_states[0][:, -1]
        drafted = sampling_probs(lm.decode(exit_state)[0], 1.0, 0.9)
        assert bool(gate.exit_mask(exit_state, 1, lm)[0][0])  # the first token is always a draft
    assert tv(drafted, p1) > 0.5
    exact = [p1, p1 @ p2]  # next token; the one after it, marginalised over the next
    got = torch.tensor(samples)
    for i in range(2):
        empirical = torch.bincount(got[:, i], minlength=vocab).float() / n
        assert tv(empirical, exact[i]) < 0.1, (i, empirical, exact[i])


# --------------------------------------------------------------------------- embedded model


def stdlib_prompts(n: int, chars: int = 300) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4000)
    step = max(1, len(files) // n)
    return [p.read_text(errors="replace")[:chars] for p in files[::step][:n]]


def test_benchmark_runs_on_a_model_dir_with_a_policy(tmp_path, tokenizer, capsys, monkeypatch):
    """benchmarks/speculative.py --model DIR --policy FILE (what is run on the demo's LITE model): every row,
    the lossless ones really lossless (drafts counted, the reference's tokens)."""
    import importlib.util

    from conftest import save_tiny

    lm = save_tiny(tmp_path / "model", tokenizer)
    policy = constant_policy(lm, exit=True).save(tmp_path / "policy.pt")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speculative.py"
    spec = importlib.util.spec_from_file_location("speculative_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    bench.main(["--model", str(tmp_path / "model"), "--policy", str(policy), "--prompts", "1", "--max-new-tokens", "4",
                "--probe-prompts", "1", "--probe-tokens", "2", "--fixed-layers", "4", "--threads", "1"])
    table = capsys.readouterr().out.split("batch 1 ==")[1]
    rows = {line[:34].strip(): line[34:].split() for line in table.strip().splitlines()[1:-1] if line.strip()}
    assert {"HF generate", "GreenCode full", "lossless fixed(k=4)", "lossless policy(T=0.9)",
            "lossy policy(T=0.9)"} <= set(rows)
    for name in ("lossless fixed(k=4)", "lossless policy(T=0.9)"):
        accept, depth, same = rows[name][2], rows[name][3], rows[name][6]
        assert accept != "-" and float(depth) == 4.0 and same == "1.000", (name, rows[name])


@pytest.mark.integration
def test_embedded_model_greedy_is_exact_on_code(embedded):
    """4 stdlib prompts (about 50 tokens each), 6 new tokens, fixed / confidence / policy drafts in turn: each
    gate drafts, and some drafts are accepted and some rejected (the 4th prompt accepts one of the fixed gate's;
    the first 3 reject all), every output the full model's greedy tokens."""
    lm, n = embedded, 6
    gates = [FixedGate(22), ConfidenceGate(0.5), PolicyGate(coin_policy(lm), 0.5)]
    gen = LosslessGenerator(lm)
    cfg = GenerationConfig(max_new_tokens=n, lossless=True, speculative=SpeculativeConfig(min_draft=1, max_draft=3))
    drafted, accepted = [0, 0, 0], 0
    for i, text in enumerate(stdlib_prompts(21, chars=200)[:4]):
        prompt = lm.tokenizer(text)["input_ids"]
        got = gen.generate([prompt], gates[i % 3], cfg)[0]
        assert got.token_ids == hf_greedy(lm, prompt, n), f"prompt {i} with {gates[i % 3].describe()}"
        drafted[i % 3] += got.speculative["drafted_tokens"]
        accepted += got.speculative["accepted_tokens"]
    assert all(drafted) and 0 < accepted < sum(drafted), (drafted, accepted)
