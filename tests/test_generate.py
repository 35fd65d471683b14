"""Exactness of gated generation on tiny Llama- and OPT-shaped models."""

import pytest
import torch

from conftest import make_tiny, poison
from greencode.config import GenerationConfig
from greencode.gates import ConfidenceGate, FixedGate, FullGate, PolicyGate
from greencode.generate import GatedGenerator
from greencode.policy import ExitPolicy

PROMPTS = [[5, 17, 300, 42, 8, 99], [9, 1000, 3], [77, 12, 4000, 5, 6, 7, 8, 9, 10]]
GREEDY = GenerationConfig(max_new_tokens=12)


def hf_greedy(lm, prompt, n=12):
    out = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def never_exit_policy(lm):
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    with torch.no_grad():
        policy.net[-1].bias.copy_(torch.tensor([10.0, -10.0]))
    return policy


@pytest.fixture(params=["llama", "opt"])
def lm(request):
    return make_tiny(request.param)


@pytest.mark.parametrize("kv_mode", ["propagate", "none"])
def test_full_gate_equals_hf_generate(lm, kv_mode):
    gen = GatedGenerator(lm)
    for p in PROMPTS:
        res = gen.generate([p], FullGate(), GenerationConfig(max_new_tokens=12, kv_mode=kv_mode))[0]
        assert res.token_ids == hf_greedy(lm, p)
        assert res.layers_per_token == [lm.num_layers] * 12


def test_policy_that_never_exits_equals_full(lm):
    gen = GatedGenerator(lm)
    gate = PolicyGate(never_exit_policy(lm), threshold=0.99)
    for p in PROMPTS:
        assert gen.generate([p], gate, GREEDY)[0].token_ids == hf_greedy(lm, p)


def test_fixed_final_layer_equals_full(lm):
    gen = GatedGenerator(lm)
    full = gen.generate(PROMPTS, FullGate(), GREEDY)
    fixed = gen.generate(PROMPTS, FixedGate(lm.num_layers), GREEDY)
    assert [r.token_ids for r in fixed] == [r.token_ids for r in full]


def coin_policy(lm, seed=0):
    """A linear random policy: p[exit] swings with the hidden state, so tokens exit at mixed depths."""
    torch.manual_seed(seed)
    policy = ExitPolicy(lm.hidden_size, hidden_sizes=[], exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    with torch.no_grad():
        policy.net[0].weight.mul_(20.0)
    return policy


@pytest.mark.parametrize("gate_factory", [lambda lm: FullGate(), lambda lm: FixedGate(6),
                                          lambda lm: ConfidenceGate(1e-5), lambda lm: PolicyGate(coin_policy(lm), 0.5)])
def test_batched_equals_per_sample(lm, gate_factory):
    gate = gate_factory(lm)
    gen = GatedGenerator(lm)
    batched = gen.generate(PROMPTS, gate, GREEDY)
    single = [gen.generate([p], gate, GREEDY)[0] for p in PROMPTS]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.layers_per_token for r in batched] == [r.layers_per_token for r in single]


def test_batch_rows_exit_at_different_layers(lm):
    gen = GatedGenerator(lm)
    gate = PolicyGate(coin_policy(lm), 0.5)
    results = gen.generate(PROMPTS, gate, GREEDY)
    layers = {layer for r in results for layer in r.layers_per_token[1:]}
    assert len(layers) > 1, f"expected mixed exits, got {layers}"
    single = [gen.generate([p], gate, GREEDY)[0].layers_per_token for p in PROMPTS]
    assert [r.layers_per_token for r in results] == single


@pytest.mark.parametrize("k", [4, 6, 10])
def test_fixed_without_cache_equals_plain_forward_at_layer_k(lm, k):
    gen = GatedGenerator(lm)
    res = gen.generate([PROMPTS[0]], FixedGate(k), GenerationConfig(max_new_tokens=6, kv_mode="none"))[0]
    seq = list(PROMPTS[0])
    expected = [res.token_ids[0]]  # the first token comes from the full prefill
    seq.append(res.token_ids[0])
    for _ in range(5):
        fwd = lm.forward_exits(torch.tensor([seq]))
        tok = int(lm.decode(fwd.hidden_states[fwd.layers.index(k)][:, -1]).argmax(-1))
        expected.append(tok)
        seq.append(tok)
    assert res.token_ids == expected
    assert res.layers_per_token == [lm.num_layers] + [k] * 5


def test_propagated_kv_equals_what_the_layer_caches(lm):
    """kv_projection must write exactly the K/V the layer itself would have cached."""
    from transformers import DynamicCache

    ids = torch.tensor([PROMPTS[2]])
    attn = torch.ones_like(ids)
    pos = lm.positions(attn)
    h = lm.adapter.embed(ids, pos)
    cache = DynamicCache(config=lm.model.config)
    kwargs = lm.adapter.layer_kwargs(h, pos, None, cache)
    with torch.no_grad():
        for i in range(3):
            k, v = lm.adapter.kv_projection(i, h, kwargs)
            lm.adapter.run_layer(i, h, kwargs)
            torch.testing.assert_close(cache.layers[i].keys, k)
            torch.testing.assert_close(cache.layers[i].values, v)
            h = lm.adapter.run_layer(i, h, {**kwargs, "past_key_values": None, "use_cache": False})


def test_skipped_layers_get_the_kv_of_the_exited_state(lm):
    """After a token exits at layer 4, every layer's cache has its position: layers 1-4 the K/V they computed,
    each deeper layer the K/V its own projections give the layer-4 state (METHOD §5 (b)), values checked."""
    from transformers import DynamicCache

    gen = GatedGenerator(lm)
    prompt = PROMPTS[0]
    pre = gen.prefill([prompt], False)
    token = int(pre.output.logits.argmax(-1))
    attn = torch.ones(1, len(prompt) + 1, dtype=torch.long)
    out = gen.step(torch.tensor([[token]]), attn, pre.cache, FixedGate(4))
    assert out.exit_layers.tolist() == [4]

    seq = torch.tensor([prompt + [token]])
    full = DynamicCache(config=lm.model.config)  # every layer of every position computed for real
    gen.step(seq, attn, full, FullGate())
    h4 = lm.forward_exits(seq).hidden_states[lm.exit_points.index(4)][:, -1:]
    pos = lm.positions(attn)[:, -1:]
    kwargs = lm.adapter.layer_kwargs(h4, pos, None, None)
    for j, (got, ref) in enumerate(zip(pre.cache.layers, full.layers, strict=True)):
        assert got.keys.shape[-2] == len(prompt) + 1, f"layer {j + 1} has no entry for the new token"
        torch.testing.assert_close(got.keys[..., :-1, :], ref.keys[..., :-1, :], rtol=1e-4, atol=1e-5)
        if j < 4:  # ran the layer: exactly what the full model caches
            torch.testing.assert_close(got.keys[..., -1:, :], ref.keys[..., -1:, :], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.values[..., -1:, :], ref.values[..., -1:, :], rtol=1e-4, atol=1e-5)
        else:  # skipped: projected from the exited layer-4 state, not computed from its own input
            keys, values = lm.adapter.kv_projection(j, h4, kwargs)
            torch.testing.assert_close(got.keys[..., -1:, :], keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got.values[..., -1:, :], values, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pre.cache.layers[-1].keys[..., -1:, :], full.layers[-1].keys[..., -1:, :])


def test_sampling_samples(lm):
    """Seeded sampling is reproducible, differs between seeds and from greedy; top_p -> 0 keeps only the top token."""
    gen = GatedGenerator(lm)

    def tokens(**kw):
        return gen.generate([PROMPTS[0]], FullGate(), GenerationConfig(max_new_tokens=8, **kw))[0].token_ids

    greedy = tokens()
    a, b = tokens(temperature=1.0, seed=123), tokens(temperature=1.0, seed=123)
    assert a == b
    assert a != greedy and tokens(temperature=1.0, seed=7) != a
    assert tokens(temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_stop_sequence_and_eos(tokenizer):
    lm = make_tiny("llama", tokenizer=tokenizer)
    gen = GatedGenerator(lm)
    free = gen.generate(["def f(x):"], FullGate(), GenerationConfig(max_new_tokens=10))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    stop = free.text[3:6]
    stopped = gen.generate(["def f(x):"], FullGate(), GenerationConfig(max_new_tokens=10, stop=[stop]))[0]
    assert stopped.finish_reason == "stop_sequence"
    assert stop not in stopped.text and free.text.startswith(stopped.text)
    gen.eos_ids = {free.token_ids[2]}
    eos = gen.generate(["def f(x):"], FullGate(), GenerationConfig(max_new_tokens=10))[0]
    assert eos.finish_reason == "eos_token"
    assert eos.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]


def test_a_row_whose_prompt_breaks_the_model_fails_alone(lm):
    gen = GatedGenerator(lm)
    free = gen.generate(PROMPTS, FullGate(), GREEDY)
    poison(lm, 4000)  # only in PROMPTS[2]
    *steps, finished = gen.stream(PROMPTS, FullGate(), GREEDY)
    failed = [e for events in steps for e in events if e.finish_reason == "error"]
    assert [(e.row, e.token_id, e.text) for e in failed] == [(2, None, "")] and "non-finite" in failed[0].error
    broken, *rest = finished.results[2], *finished.results[:2]
    assert broken.finish_reason == "error" and broken.token_ids == [] and broken.error == failed[0].error
    assert [r.token_ids for r in rest] == [r.token_ids for r in free[:2]] and all(r.error is None for r in rest)
    sampled = gen.generate(PROMPTS, FullGate(), GenerationConfig(max_new_tokens=12, temperature=0.7, seed=1))
    assert [r.finish_reason for r in sampled] == ["length", "length", "error"]  # no raise, no NaN draw


def test_a_row_that_breaks_midway_keeps_its_tokens_and_fails_alone():
    lm = make_tiny("llama")
    gen = GatedGenerator(lm)
    free = gen.generate(PROMPTS, FullGate(), GREEDY)
    said = free[0].token_ids[0]
    assert all(said not in r.token_ids for r in free[1:])  # the tiny model's rows say different tokens
    poison(lm, said)  # row 0 breaks once its first token is fed back
    results = gen.generate(PROMPTS, FullGate(), GREEDY)
    assert results[0].finish_reason == "error" and results[0].token_ids == [said]
    assert [r.token_ids for r in results[1:]] == [r.token_ids for r in free[1:]]


def test_streamed_text_joins_to_the_whole_text(tokenizer):
    """Every token event's text, joined, is the result's text (held back while a stop sequence may start)."""
    gen = GatedGenerator(make_tiny("llama", tokenizer=tokenizer))
    free = gen.generate(["def f(x):"], FullGate(), GenerationConfig(max_new_tokens=12))[0]
    for stop in ([], [free.text[4:7]], [free.text[-2:] + "never"]):
        cfg = GenerationConfig(max_new_tokens=12, stop=stop)
        *steps, finished = gen.stream(["def f(x):"], FullGate(), cfg)
        [result] = finished.results
        assert "".join(e.text for events in steps for e in events) == result.text
        assert free.text.startswith(result.text) and not any(s in result.text for s in stop)


def test_energy_is_measured_and_split_over_the_batch(lm, tmp_path, monkeypatch):
    """A RAPL counter that advances 3 J during generation: each of 3 rows reports 1 J, measured, not guessed."""
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    counter = zone / "energy_uj"
    counter.write_text("1000000\n")
    monkeypatch.setattr("greencode.energy.RAPL_ROOT", tmp_path)
    gen = GatedGenerator(lm)
    assert gen.meter.source == "rapl"
    items = gen.stream(PROMPTS, FullGate(), GenerationConfig(max_new_tokens=3))
    next(items)  # the first tokens: the meter is running
    counter.write_text("4000000\n")
    *_, finished = items
    assert [r.energy_j for r in finished.results] == pytest.approx([1.0, 1.0, 1.0])
    assert all(r.time_s > 0 for r in finished.results)


def test_energy_is_null_without_a_meter(lm, tmp_path, monkeypatch):
    monkeypatch.setattr("greencode.energy.RAPL_ROOT", tmp_path)  # no powercap zones, CPU model: no meter
    res = GatedGenerator(lm).generate([PROMPTS[0]], FullGate(), GREEDY)[0].to_dict()
    assert res["energy_j"] is None and res["time_s"] > 0 and res["mean_layers"] == lm.num_layers


def test_prompts_get_no_bos_even_from_a_tokenizer_that_adds_one(tokenizer):
    """Prompts are tokenized like the pipeline's data (greencode.tokens.encode): a tokenizer that adds BOS by
    default (Llama 3 style) must not slip a token into generation that fine-tuning and shards never saw."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from greencode.data import SourceFile, line_completion_samples
    from greencode.tokens import encode

    tok = copy.deepcopy(tokenizer)
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A",
                                                              special_tokens=[("<|im_start|>", bos)])
    text = "def add(a, b):\n    return a + b\n" * 20
    assert tok(text)["input_ids"][0] == bos  # the trap this test is about
    ids = encode(tok, text)
    assert bos not in ids
    assert GatedGenerator(make_tiny("llama", tokenizer=tok)).encode([text]) == [ids]
    [sample] = line_completion_samples([SourceFile("a.py", text, "python")], tok, 1)
    assert sample.context_ids == ids[: len(sample.context_ids)]


class _KeepsPrefill(GatedGenerator):
    """Keeps its last prompt pass, whose cache the decoding steps then fill: the test reads every layer's K/V."""

    def prefill(self, *args, **kwargs):
        self.kept = super().prefill(*args, **kwargs)
        return self.kept


MIXED_PROMPTS = PROMPTS + [[3, 14, 15, 92, 65], [2718, 28], [11, 22, 33, 44, 55, 66, 77]]


def test_rows_exiting_at_different_layers_every_step_keep_the_one_row_cache(lm):
    """Row compaction: a batch whose rows leave at different layers on every step decodes the tokens and
    exit layers of one-row runs and ends with, at every layer, each row's K/V of its one-row run (left
    padding stripped), both for layers the row ran and layers it skipped (projected K/V)."""
    gate = PolicyGate(coin_policy(lm), 0.5)
    cfg = GenerationConfig(max_new_tokens=10)
    gen = _KeepsPrefill(lm)
    batched = gen.generate(MIXED_PROMPTS, gate, cfg)
    batch_cache, width = gen.kept.cache, gen.kept.input_ids.shape[1]
    per_step = [{r.layers_per_token[t] for r in batched} for t in range(1, cfg.max_new_tokens)]
    assert all(len(layers) > 1 for layers in per_step), f"every step needs mixed exits, got {per_step}"
    for r, prompt in enumerate(MIXED_PROMPTS):
        single = gen.generate([prompt], gate, cfg)[0]
        assert (batched[r].token_ids, batched[r].layers_per_token) == (single.token_ids, single.layers_per_token)
        n = len(prompt) + cfg.max_new_tokens - 1  # the last token is never fed back
        for j, (got, ref) in enumerate(zip(batch_cache.layers, gen.kept.cache.layers, strict=True)):
            assert got.keys.shape[-2] == width + cfg.max_new_tokens - 1
            torch.testing.assert_close(got.keys[r : r + 1, :, width - len(prompt) :], ref.keys, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, j=j, r=r: f"row {r} layer {j + 1} keys: {m}")
            torch.testing.assert_close(got.values[r : r + 1, :, width - len(prompt) :], ref.values, rtol=1e-4,
                                       atol=1e-5, msg=lambda m, j=j, r=r: f"row {r} layer {j + 1} values: {m}")
            assert ref.keys.shape[-2] == n


class _HalfLeaves(FixedGate):
    """Sends every other running row out at ``exit_layer``; the rest run every layer."""

    def exit_mask(self, hidden, layer, decode):
        leave = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        leave[::2] = layer == self.exit_layer
        return leave, None


def test_only_running_rows_enter_a_layer(lm):
    """After half the batch leaves at layer 4, layers 5-12 run on the other half only (the rows that left get
    just their projected K/V); before, every layer ran on the whole batch and threw the leavers' output away."""
    seen = {i: [] for i in range(lm.num_layers)}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].shape[0]))
             for i, layer in enumerate(lm.adapter.layers)]
    try:
        gen = GatedGenerator(lm)
        results = gen.generate(MIXED_PROMPTS[:4], _HalfLeaves(4), GenerationConfig(max_new_tokens=3))
    finally:
        for hook in hooks:
            hook.remove()
    assert [r.layers_per_token for r in results] == [[12, 4, 4], [12, 12, 12]] * 2
    assert all(seen[i] == [4, 4, 4] for i in range(4))  # prefill + 2 decoding steps, whole batch
    assert all(seen[i] == [4, 2, 2] for i in range(4, lm.num_layers))
