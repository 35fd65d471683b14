"""The tiny pipeline with ``run_dir: s3://...`` on a two-node local Ray cluster against a local S3
server (moto): nothing under the working directory, every artifact in the bucket, published by pointer.

The head node has no CPUs, so every task, Ray Train worker, RLlib and Tune trial runs on the second
node. One module fixture runs the pipeline: a first attempt (a separate process) is SIGKILLed in
extraction while a second pipeline on the same URI is refused; the rerun (in process) finishes it; an
unchanged rerun, a changed setting and a lost scratch copy follow; then Serve loads the model and
policy from the bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import save_tiny
from greencode.config import PipelineConfig, validate
from greencode.storage import Store, scratch_dir
from test_pipeline_integrity import Attempt, captured_logs, pipeline_argv, pipeline_config

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
LEASE_S = 4.0
STAGES = ("finetune", "extract", "extract_heldout", "sweep", "evaluate")


@pytest.fixture(scope="module")
def node_cache(tmp_path_factory) -> Path:
    """The second node's own cache (its processes' GREENCODE_CACHE), apart from the driver's: what a
    worker fetched from the bucket lands here, and the driver's scratch copy is not under it."""
    return tmp_path_factory.mktemp("node-cache")


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory, node_cache):
    """Two local Ray nodes: a CPU-less head (the driver's) and a second node that runs all the work."""
    import ray
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("GREENCODE_CACHE", "RAY_TMPDIR")}
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live below
    os.environ.update(GREENCODE_CACHE=str(tmp_path_factory.mktemp("cache")), RAY_TMPDIR=tmp)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                                "dashboard_port": free_port()})
    driver_cache, os.environ["GREENCODE_CACHE"] = os.environ["GREENCODE_CACHE"], str(node_cache)
    nodes.add_node(num_cpus=2, resources={"second_node": 1})  # its raylet and workers keep node_cache
    os.environ["GREENCODE_CACHE"] = driver_cache
    nodes.wait_for_nodes()
    ray.init(address=nodes.address)
    with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as fh:  # state queries go to this cluster
        fh.write(ray.get_runtime_context().gcs_address)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class S3Run:
    root: Path
    uri: str
    bucket: str
    seen: dict[str, Any] = field(default_factory=dict)


def s3_config(root: Path, uri: str, **sections: Any) -> dict[str, Any]:
    data = pipeline_config(root, **sections)
    data.update(run_dir=uri, lock_lease_s=LEASE_S)
    data["finetune"] = {**data["finetune"], "max_steps": 2, "val_every": 2}
    data["sweep"] = {**data["sweep"], "alpha": [0.1]}
    data["policy"]["ppo"]["total_env_steps"] = 200
    return data


def logged(fn, *args):
    with captured_logs() as lines:
        out = fn(*args)
    return out, "\n".join(lines)


@pytest.fixture(scope="module")
def s3_run(cluster, s3_server, tmp_path_factory, tokenizer) -> S3Run:
    from workflows import pipeline

    root = tmp_path_factory.mktemp("s3run")
    save_tiny(root / "base", tokenizer)
    (root / "corpus").mkdir()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        shutil.copy(f, root / "corpus" / f.name)
    bucket = s3_server.bucket()
    r = S3Run(root, f"s3://{bucket}/run", bucket)
    store = Store(r.uri)
    config_path = root / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(s3_config(root, r.uri)))
    scratch = scratch_dir(r.uri)

    # 1: a first attempt; a second pipeline on the same URI is refused while it runs; SIGKILL in extraction
    a = Attempt(pipeline_argv(config_path), root / "attempt1.log")
    a.wait_for(lambda: "[1/5] finetune ..." in a.log(), "the finetune stage")
    second = subprocess.run([sys.executable, *pipeline_argv(config_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    r.seen["second"] = {"returncode": second.returncode, "output": second.stdout + second.stderr, "first": a.proc.pid}
    a.wait_for((scratch / "shards" / "train" / "shard-00000.parquet").exists, "the first shard", timeout=600)
    a.kill()
    r.seen["after_kill"] = {"keys": s3_server.keys(bucket),
                            "manifest": json.loads(store.read_bytes("manifest.json"))["stages"]}
    time.sleep(LEASE_S + 1)  # the killed holder's lease runs out

    # 2: the rerun finishes it; 3: an unchanged rerun; 4: one changed setting
    cfg = validate(PipelineConfig, s3_config(root, r.uri))
    outcome, r.seen["rerun"] = logged(pipeline.run, cfg)
    r.seen["final"] = pipeline.final_message(cfg, outcome)
    r.seen["keys"] = s3_server.keys(bucket)
    r.seen["uploads"] = {(name, attempt.split("/")[0], store.pointer(name)["attempt"])  # (pyarrow leaves empty
                         for name, attempt in (k[len("run/"):].split(".attempts/") for k in r.seen["keys"]
                                               if ".attempts/" in k and not k.endswith("/"))}  # "dir/" markers)
    _, r.seen["unchanged"] = logged(pipeline.run, cfg)
    changed = validate(PipelineConfig, s3_config(root, r.uri, evaluate={"thresholds": [0.6]}))
    _, r.seen["changed"] = logged(pipeline.run, changed)
    # 5: a node with no scratch copy reuses everything from the bucket
    shutil.rmtree(scratch)
    _, r.seen["fresh_scratch"] = logged(pipeline.run, changed)
    return r


def skipped(log: str) -> set[str]:
    return {s for s in STAGES if f"{s}: done earlier" in log}


def test_the_work_runs_on_the_second_node(cluster):
    import ray

    cpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
    assert [n["Resources"].get("second_node") for n in cpu_nodes] == [1.0]
    assert ray.get_runtime_context().get_node_id() not in {n["NodeID"] for n in cpu_nodes}


def test_a_second_pipeline_on_the_same_uri_is_refused_while_the_first_holds_it(s3_run):
    second = s3_run.seen["second"]
    assert second["returncode"] != 0
    assert f"{s3_run.uri} is in use by pipeline pid {second['first']}" in second["output"]


def test_a_killed_stage_leaves_no_artifact_visible(s3_run):
    seen = s3_run.seen["after_kill"]
    assert seen["manifest"]["finetune"]["status"] == "done"
    assert seen["manifest"]["extract"]["status"] == "running"
    assert "run/model.pointer.json" in seen["keys"]
    assert not [k for k in seen["keys"] if k.startswith("run/shards")]


def test_every_artifact_is_in_the_bucket_and_nothing_under_the_working_directory(s3_run):
    keys = s3_run.seen["keys"]
    for pointer in ("manifest.json", "model.pointer.json", "shards/train.pointer.json",
                    "shards/heldout.pointer.json", "policy/exit_policy.pt.pointer.json", "report.pointer.json",
                    "report/results.json.pointer.json"):
        assert f"run/{pointer}" in keys
    assert any(k.startswith("run/finetune/lite/checkpoint_") for k in keys)  # Ray Train's checkpoints
    assert any(k.startswith("run/tune/") and k.endswith("result.json") for k in keys)  # Tune's trials
    assert any(k.startswith("run/sweep/") and "/trials/" in k for k in keys)  # the sweep's trial records
    uploads = s3_run.seen["uploads"]  # one upload per artifact: the one its pointer names (a cut-off one was cleaned)
    assert uploads and all(attempt == pointed for _, attempt, pointed in uploads), uploads
    assert not (REPO / "s3:").exists() and not Path("s3:").exists()
    assert f"greencode serve --model {s3_run.uri}/model" in s3_run.seen["final"]
    assert f"--policy {s3_run.uri}/policy/exit_policy.pt" in s3_run.seen["final"]


def test_the_rerun_finishes_the_killed_stage_reusing_the_finished_one(s3_run):
    assert skipped(s3_run.seen["rerun"]) == {"finetune"}


def test_an_unchanged_rerun_skips_every_stage(s3_run):
    assert skipped(s3_run.seen["unchanged"]) == set(STAGES)


def test_a_changed_setting_reruns_that_stage_only(s3_run):
    assert skipped(s3_run.seen["changed"]) == set(STAGES) - {"evaluate"}
    assert "config thresholds: [0.5] -> [0.6]" in s3_run.seen["changed"]


def test_a_node_without_the_scratch_copy_fetches_the_artifacts_and_reruns_nothing(s3_run):
    assert skipped(s3_run.seen["fresh_scratch"]) == set(STAGES)
    assert "fetched model from" in s3_run.seen["fresh_scratch"]


def test_env_runners_and_tune_trials_read_the_shards_from_the_bucket(s3_run, node_cache):
    # the second node has no scratch copy of the run: the shards its PPO env runners and Tune trials
    # replayed (and the model its extraction and evaluation workers ran) it fetched from the bucket into
    # its own cache, once each
    assert not (node_cache / "runs").exists()
    fetched = sorted(p.name for p in (node_cache / "artifacts").glob("*/[!.]*"))
    assert fetched == ["heldout", "model", "train"], fetched
    store = Store(s3_run.uri)
    trial_params = [k for k in s3_run.seen["keys"] if k.startswith("run/tune/") and k.endswith("/params.json")]
    assert trial_params
    base = json.loads(store.read_bytes(trial_params[0][len("run/"):]))["trial"]["config"]
    assert base["shards_dir"] == f"{s3_run.uri}/shards/train"
    assert base["eval_shards_dir"] == f"{s3_run.uri}/shards/heldout"
    assert any(k.startswith("run/tune/") and k.endswith(".greencode-work.json") for k in s3_run.seen["keys"])


def test_serve_loads_the_model_and_policy_from_the_bucket(s3_run, node_cache):
    import httpx
    import ray
    from ray import serve

    from greencode.config import ServeConfig
    from workflows import serve as serve_command

    shutil.rmtree(node_cache / "artifacts", ignore_errors=True)  # the pipeline's own fetches
    cfg = validate(ServeConfig, {"model": {"name": f"{s3_run.uri}/model"}, "num_cpus": 1,
                                 "policy_path": f"{s3_run.uri}/policy/exit_policy.pt"})
    port = free_port()
    try:
        serve_command.run(cfg, port=port)
        reply = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=120,
                           json={"inputs": "def fib(n):", "parameters": {"max_new_tokens": 3}})
    finally:
        serve.shutdown()
    assert reply.status_code == 200, reply.text
    assert isinstance(reply.json()["generated_text"], str)
    fetched = sorted(p.name for p in (node_cache / "artifacts").glob("*/[!.]*"))
    assert fetched == ["exit_policy.pt", "model"]  # one download each, on the replica's node
    assert ray.is_initialized()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
