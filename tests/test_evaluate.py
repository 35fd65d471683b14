"""The evaluation harness on tiny saved models: every report file, resume, Ray, CLI parsing."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch

from conftest import make_tiny, make_tiny_qwen_fim
from greencode.config import EvalConfig, GenerationConfig
from greencode.evaluation.parts import part_path
from greencode.evaluation.plan import plan_settings
from greencode.evaluation.report import REPORT_FILES
from greencode.evaluation.runner import Evaluator, PromptReplayGenerator, run_evaluation
from greencode.gates import ConfidenceGate, FixedGate, FullGate
from greencode.generate import GatedGenerator
from greencode.policy import ExitPolicy
from test_data import JAVA_SOURCE, PY_SOURCE

torch.set_num_threads(1)  # the test machine is shared; more threads only contend


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """A tiny 'fine-tuned' model, a tiny 'base' model (other seed) and a random policy, all on disk."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed in (("lite", 0), ("base", 1)):
        lm = make_tiny("llama", seed=seed, tokenizer=tokenizer)
        lm.model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
        if name == "lite":
            torch.manual_seed(0)
            policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
            paths["policy"] = str(policy.save(root / "policy.pt"))
    return paths


@pytest.fixture(scope="module")
def py_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pysrc")
    for i in range(12):
        (root / f"mod{i}.py").write_text(PY_SOURCE.replace("Counter", f"Counter{i}") * 3)
    return root


def eval_config(models, corpus, out, **extra):
    data = {"model": {"name": models["lite"]}, "data": {"corpus": corpus, "test_fraction": 0.25, "context_cap": 64},
            "generation": {"max_new_tokens": 4}, "num_samples": 3, "batch_size": 2, "output_dir": str(out),
            "confidences": [1e-9, 0.9], "thresholds": [0.3, 0.9]}
    data.update(extra)
    return EvalConfig.model_validate(data)


def test_harness_writes_every_report_file(models, py_corpus, tmp_path):
    cfg = eval_config(models, f"dir:{py_corpus}", tmp_path / "report", base_model={"name": models["base"]},
                      policy_path=models["policy"])
    report = run_evaluation(cfg)
    for name in REPORT_FILES:
        assert (tmp_path / "report" / name).is_file(), name
    assert (tmp_path / "report" / "quality_vs_layers.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["setting"].split("@")[0]: r for r in report.rows}
    assert list(rows) == ["base", "full", "fixed-k4", "fixed-k6", "fixed-k10", "confidence-c1e-09",
                          "confidence-c0.9", "policy-T0.3", "policy-T0.9"]
    assert rows["base"]["model"] == models["base"] and rows["full"]["model"] == models["lite"]
    assert rows["full"]["mean_layers"] == 12 and rows["full"]["layers_skipped_pct"] == 0
    for k in (4, 6, 10):  # the first token comes from the full prompt pass, every later one exits at k
        assert rows[f"fixed-k{k}"]["mean_layers_after_first"] == k
    assert rows["confidence-c1e-09"]["mean_layers_after_first"] == 4  # everything is confident enough
    for r in report.rows:
        assert r["samples"] == 3 and r["generated_tokens"] == 12
        assert 0 <= r["rouge_l"] <= 1 and 0 <= r["codebleu"] <= 1
        assert r["latency_s"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["gate_overhead"] < 1
        assert r["energy_j"] is None or r["energy_j"] > 0  # measured or null, never invented
    assert rows["full"]["rouge_l_delta_vs_full"] == 0
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["setting"] for r in saved["rows"]] == [r["setting"] for r in report.rows]
    csv_lines = (tmp_path / "report" / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(report.rows) and csv_lines[0].startswith("setting,family")
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| Setting | Model | CodeBLEU |" in table and "| fixed-k6 |" in table and "| policy-T0.9 |" in table


def test_rerun_skips_finished_parts_and_redoes_missing_ones(models, py_corpus, tmp_path, monkeypatch):
    cfg = eval_config(models, f"dir:{py_corpus}", tmp_path / "r", gates=["full", "fixed"])
    first = run_evaluation(cfg)
    calls = []
    original = Evaluator.run_batch

    def spy(self, batch, settings, keys):
        calls.append((batch.batch_id, [s.name for s in settings]))
        return original(self, batch, settings, keys)

    monkeypatch.setattr(Evaluator, "run_batch", spy)
    again = run_evaluation(cfg)
    assert calls == []
    assert [r["rouge_l"] for r in again.rows] == [r["rouge_l"] for r in first.rows]
    part_path(tmp_path / "r", "fixed-k6@0.2", "ctx0.2-b0001").unlink()
    run_evaluation(cfg)
    assert calls == [("ctx0.2-b0001", ["fixed-k6@0.2"])]
    # a stored part from another configuration is not reused
    run_evaluation(eval_config(models, f"dir:{py_corpus}", tmp_path / "r", gates=["full", "fixed"],
                         generation={"max_new_tokens": 3}))
    assert len(calls) == 3 and calls[-1][1] == ["full@0.2", "fixed-k4@0.2", "fixed-k6@0.2", "fixed-k10@0.2"]


def test_a_policy_replaced_under_the_same_path_is_evaluated_again(models, py_corpus, tmp_path, monkeypatch):
    """Parts key the policy by content: `greencode eval` after retraining never reports the old policy's rows."""
    from greencode.digests import tree_digest

    policy = tmp_path / "policy.pt"
    shutil.copy(models["policy"], policy)
    cfg = eval_config(models, f"dir:{py_corpus}", tmp_path / "r", gates=["full", "policy"], thresholds=[0.3],
                      num_samples=2, policy_path=str(policy))
    run_evaluation(cfg)
    calls = []
    original = Evaluator.run_batch

    def spy(self, batch, settings, keys):
        calls.append([s.name for s in settings])
        return original(self, batch, settings, keys)

    monkeypatch.setattr(Evaluator, "run_batch", spy)
    lm = make_tiny("llama", seed=0)
    torch.manual_seed(7)
    ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint).save(policy)
    run_evaluation(cfg)
    assert calls == [["policy-T0.3@0.2"]]  # the model did not change: its rows are kept
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["digests"]["policy"] == tree_digest(policy)
    assert saved["digests"]["model"] == tree_digest(models["lite"])
    assert f"policy `{tree_digest(policy)}`" in (tmp_path / "r" / "report.md").read_text()


def test_fim_task_gives_the_model_the_text_after_the_span(py_corpus, tmp_path):
    from greencode.data import load_corpus
    from greencode.evaluation.plan import make_plan
    from greencode.fim import fim_prompt_ids
    from greencode.modeling import load_model

    saved = make_tiny_qwen_fim()
    saved.model.save_pretrained(tmp_path / "qwen")
    saved.tokenizer.save_pretrained(tmp_path / "qwen")
    cfg = eval_config({"lite": str(tmp_path / "qwen")}, f"dir:{py_corpus}", tmp_path / "fim", gates=["full"],
                      task="fim", fim_suffix_tokens=20)
    report = run_evaluation(cfg)
    [row] = report.rows
    assert row["samples"] == 3
    assert "task: fim (psm, up to 20 suffix tokens)" in (tmp_path / "fim" / "report.md").read_text()
    lm = load_model(cfg.model)  # as the evaluation loads it (a Qwen2 dir gets Qwen2's tokenizer class)
    texts = {f.path: f.text for f in load_corpus(cfg.data).files}
    samples = make_plan(cfg, lm).samples[0.2]
    for s in samples:  # the span is cut from the middle: the model is given the code on both sides of it
        assert s.suffix_text and s.context_text + s.target_text + s.suffix_text in texts[s.path]
    prompts = [fim_prompt_ids(lm.tokenizer, s.context_text, s.suffix_text) for s in samples[:2]]
    want = GatedGenerator(lm).generate(prompts, FullGate(), cfg.generation)
    part = json.loads(part_path(tmp_path / "fim", "full@0.2", "ctx0.2-b0000").read_text())
    assert [c["token_ids"] for c in part["completions"]] == [r.token_ids for r in want]


def test_fim_task_on_a_model_without_fim_tokens_fails_before_any_work(models, py_corpus, tmp_path):
    with pytest.raises(ValueError, match="fill-in-the-middle needs a model whose tokenizer has FIM tokens"):
        run_evaluation(eval_config(models, f"dir:{py_corpus}", tmp_path / "nofim", task="fim"))
    assert not (tmp_path / "nofim" / "parts").exists()


def test_policy_rows_absent_without_policy():
    cfg = EvalConfig(gates=["full", "fixed", "confidence", "policy"], confidences=[0.5], context_fractions=[0.2, 0.5])
    settings = plan_settings(cfg, [4, 6])
    assert {s.family for s in settings} == {"full", "fixed", "confidence"}
    assert [s.name for s in settings][:4] == ["full@0.2", "fixed-k4@0.2", "fixed-k6@0.2", "confidence-c0.5@0.2"]
    assert len(settings) == 8


def test_bad_policy_fails_before_any_work(models, py_corpus, tmp_path):
    other = make_tiny("llama", seed=5)
    bad = ExitPolicy(other.hidden_size, exit_points=other.exit_points, model_fingerprint=other.fingerprint)
    cfg = eval_config(models, f"dir:{py_corpus}", tmp_path / "bad", policy_path=str(bad.save(tmp_path / "bad.pt")))
    with pytest.raises(ValueError, match="was trained on model"):
        run_evaluation(cfg)
    assert not (tmp_path / "bad" / "parts").exists()


def test_policy_gate_alone_without_policy_is_an_error(models, py_corpus, tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_evaluation(eval_config(models, f"dir:{py_corpus}", tmp_path / "none", gates=["policy"]))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_replayed_prompt_pass_is_exact_and_happens(arch, tokenizer):
    """Replay must happen (one pass for five settings) and equal a fresh pass bit for bit."""
    lm = make_tiny(arch, tokenizer=tokenizer)
    prompts = [list(range(300, 340)), list(range(500, 517))]
    plain, replaying = GatedGenerator(lm), PromptReplayGenerator(lm)
    cfg = GenerationConfig(max_new_tokens=6)
    gates = (FullGate(), FixedGate(4), ConfidenceGate(0.01), FixedGate(10), FullGate())
    for gate in gates:
        expected = plain.generate(prompts, gate, cfg)
        got = replaying.generate(prompts, gate, cfg)
        assert [r.token_ids for r in got] == [r.token_ids for r in expected], gate.describe()
        assert [r.layers_per_token for r in got] == [r.layers_per_token for r in expected], gate.describe()
    assert (replaying.passes, replaying.replays) == (1, len(gates) - 1)
    fresh, replayed = plain.prefill(prompts, False), replaying.prefill(prompts, False)
    assert replaying.replays == len(gates)
    assert torch.equal(replayed.output.logits, fresh.output.logits)
    assert torch.equal(replayed.attention_mask, fresh.attention_mask)
    for mine, theirs in zip(replayed.cache.layers, fresh.cache.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    other = [p[1:] for p in prompts]  # different prompts: a new pass, never a replay
    replaying.generate(other, FullGate(), cfg)
    assert (replaying.passes, replaying.replays) == (2, len(gates))


# --------------------------------------------------------------------------- Ray + CLI


@pytest.mark.ray
def test_ray_run_on_java_zip_matches_in_process(models, tmp_path, ray_local):
    from workflows.evaluate import run

    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(10):
            zf.writestr(f"java.base/demo/Stack{i}.java", JAVA_SOURCE.replace("Stack", f"Stack{i}") * 2)
    common = dict(gates=["full", "fixed"], data={"corpus": f"zip:{archive}", "lang": "java", "test_fraction": 0.3,
                                                 "context_cap": 64})
    report = run(eval_config(models, "", tmp_path / "ray", num_workers=2, **common))
    assert all(p.is_file() for p in report.files())
    local = run_evaluation(eval_config(models, "", tmp_path / "local", **common))
    for name in ("full@0.2", "fixed-k6@0.2"):
        ray_part = json.loads(part_path(tmp_path / "ray", name, "ctx0.2-b0000").read_text())
        local_part = json.loads(part_path(tmp_path / "local", name, "ctx0.2-b0000").read_text())
        assert [c["token_ids"] for c in ray_part["completions"]] == [c["token_ids"] for c in local_part["completions"]]
    assert [r["codebleu"] for r in report.rows] == [r["codebleu"] for r in local.rows]


def test_cli_flags_map_to_config(tmp_path):
    from workflows.evaluate import COMMAND

    cfg, _ = COMMAND.parse(["--model", "m", "--base-model", "b", "--corpus", "zip:/x.zip", "--lang", "java",
                               "--samples", "7", "--gates", "full,fixed", "--confidences", "0.5,0.8",
                               "--thresholds", "0.9,0.92", "--context-fractions", "0.2,0.5", "--output", "out",
                               "--task", "fim", "--fim-order", "spm", "--set", "batch_size=4"])
    assert (cfg.model.name, cfg.base_model.name, cfg.data.corpus, cfg.data.lang) == ("m", "b", "zip:/x.zip", "java")
    assert cfg.num_samples == 7 and cfg.gates == ["full", "fixed"] and cfg.thresholds == [0.9, 0.92]
    assert cfg.confidences == [0.5, 0.8] and cfg.context_fractions == [0.2, 0.5]
    assert cfg.output_dir == "out" and cfg.batch_size == 4 and (cfg.task, cfg.fim_order) == ("fim", "spm")


def test_cli_rejects_bad_input_with_a_named_field():
    from workflows.evaluate import main

    with pytest.raises(SystemExit, match="gates"):
        main(["--gates", "full,bogus"])
    with pytest.raises(SystemExit, match="num_samples"):
        main(["--samples", "0"])

