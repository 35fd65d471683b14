"""The storage layer against a local S3 server (moto) and a local dir: publish by pointer, the
digest-keyed fetch cache, the lease lock, and one clear error for unusable locations. No Ray."""

from __future__ import annotations

import json
import os
import time

import pytest

from greencode.locks import RunDirBusy
from greencode.storage import ObjectLock, StorageError, Store, artifact_digest, is_uri, local_copy, scratch_dir


@pytest.fixture
def bucket(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("GREENCODE_CACHE", str(tmp_path / "cache"))
    return s3_server.bucket()


def artifact(tmp_path, text="weights"):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "w.bin").write_text(text)
    return d


def test_uris_and_local_paths_are_told_apart():
    assert is_uri("s3://b/x") and is_uri("gs://b/x")
    assert not is_uri("runs/demo") and not is_uri("/abs/path") and not is_uri(None)


def test_a_published_dir_is_visible_only_through_its_pointer_and_fetched_once_per_digest(bucket, s3_server, tmp_path):
    store = Store(f"s3://{bucket}/run")
    src = artifact(tmp_path)
    assert store.pointer("model") is None
    with pytest.raises(FileNotFoundError, match="not published"):
        local_copy(f"s3://{bucket}/run/model")
    attempt = store.publish(src, "model", "sha256:abc")
    keys = s3_server.keys(bucket)
    assert keys[-1] == "run/model.pointer.json"
    assert f"run/model.attempts/{attempt}/sub/w.bin" in keys
    first = local_copy(f"s3://{bucket}/run/model")
    assert (first / "sub" / "w.bin").read_text() == "weights"
    assert local_copy(f"s3://{bucket}/run/model") == first  # cached: no second download
    store.publish(artifact(tmp_path / "v2", "new"), "model", "sha256:def")
    second = local_copy(f"s3://{bucket}/run/model")
    assert second != first and (second / "sub" / "w.bin").read_text() == "new"
    assert [k for k in s3_server.keys(bucket) if attempt in k] == []  # the superseded upload is gone


def test_an_upload_cut_off_before_its_pointer_stays_invisible_and_is_cleaned(bucket, s3_server, tmp_path):
    store = Store(f"s3://{bucket}/run")
    store.publish(artifact(tmp_path), "model", "sha256:abc")
    store.upload(artifact(tmp_path / "killed", "half"), "model.attempts/killed-attempt")  # no pointer written
    assert (local_copy(f"s3://{bucket}/run/model") / "sub" / "w.bin").read_text() == "weights"
    assert store.clean_attempts("model") == ["killed-attempt"]
    assert not [k for k in s3_server.keys(bucket) if "killed-attempt" in k]


def test_a_published_file_round_trips(bucket, tmp_path):
    store = Store(f"s3://{bucket}/run")
    (tmp_path / "p.pt").write_bytes(b"\x00policy")
    store.publish(tmp_path / "p.pt", "policy/exit_policy.pt", "sha256:p")
    assert local_copy(f"s3://{bucket}/run/policy/exit_policy.pt").read_bytes() == b"\x00policy"


def test_the_lock_refuses_a_second_holder_and_a_successor_takes_over_an_expired_lease(bucket):
    store = Store(f"s3://{bucket}/run")
    first = ObjectLock(store, lease_s=30)
    first.acquire()
    with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
        ObjectLock(store, lease_s=30).acquire()
    first._stop.set()  # the holder dies: its lease is no longer renewed
    raw, etag = store.read_versioned("pipeline.lock")
    store.replace_if_unchanged("pipeline.lock", json.dumps({**json.loads(raw), "expires_at": time.time() - 1}).encode(),
                               etag)
    with ObjectLock(store, lease_s=30):
        assert json.loads(store.read_versioned("pipeline.lock")[0])["pid"] == os.getpid()
    assert not store.exists("pipeline.lock")


def test_the_lease_is_renewed_while_the_holder_runs(bucket):
    store = Store(f"s3://{bucket}/run")
    with ObjectLock(store, lease_s=0.6):
        before = json.loads(store.read_versioned("pipeline.lock")[0])["expires_at"]
        time.sleep(0.7)
        with pytest.raises(RunDirBusy):
            ObjectLock(store, lease_s=0.6).acquire()
        assert json.loads(store.read_versioned("pipeline.lock")[0])["expires_at"] > before


def test_a_store_without_conditional_writes_refuses_the_lock_clearly(tmp_path):
    with pytest.raises(StorageError, match="no conditional write"):
        ObjectLock(Store(str(tmp_path))).acquire()


def test_a_missing_bucket_is_one_error_naming_the_uri_and_the_operation(bucket):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-gc/run: cannot write to it \(.*"):
        Store("s3://no-such-bucket-gc/run").check()
    Store(f"s3://{bucket}/run").check()  # a usable one passes and leaves nothing behind
    assert not Store(f"s3://{bucket}/run").children("")


def test_a_scheme_without_a_file_system_is_one_error():
    with pytest.raises(StorageError, match=r"foo://b/run: no file system for foo://"):
        Store("foo://b/run")


def test_a_local_store_works_the_same_way(tmp_path):
    store = Store(str(tmp_path / "run"))
    store.check()
    store.publish(artifact(tmp_path), "model", "sha256:abc")
    assert store.pointer("model")["digest"] == "sha256:abc"
    assert scratch_dir("s3://b/run") != scratch_dir("s3://b/other")


def test_wrong_credentials_are_one_error_naming_the_uri(bucket, s3_denies_access):
    with pytest.raises(StorageError, match=rf"s3://{bucket}/run: cannot write to it \(.*(denied|Access|key)"):
        Store(f"s3://{bucket}/run").check()


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the pipeline gets as far as starting Ray."""
    from workflows import pipeline

    def refuse(**_: object) -> None:
        raise AssertionError("the pipeline started Ray")

    monkeypatch.setattr(pipeline, "init_ray", refuse)


def refused_pipeline(run_dir: str) -> str:
    """The pipeline CLI's one-line error (exit status 1) for the demo preset on ``run_dir``."""
    from workflows import pipeline

    with pytest.raises(SystemExit) as exit_:
        pipeline.main(["--preset", "demo", "--set", f"run_dir={run_dir}"])
    assert isinstance(exit_.value.code, str)  # SystemExit(str): printed, exit status 1
    return exit_.value.code


def test_a_pipeline_on_a_missing_bucket_stops_before_ray_writing_nothing(bucket, s3_server, tmp_path, no_ray):
    message = refused_pipeline("s3://no-such-bucket-gc/run")
    assert message.startswith("error: s3://no-such-bucket-gc/run: cannot write to it (")
    assert not (tmp_path / "cache").exists() and not s3_server.keys(bucket)


def test_a_pipeline_with_wrong_credentials_stops_before_ray_writing_nothing(bucket, s3_server, tmp_path, no_ray,
                                                                             s3_denies_access):
    message = refused_pipeline(f"s3://{bucket}/run")
    assert message.startswith(f"error: s3://{bucket}/run: cannot write to it (")
    assert "testing" not in message  # credentials never reach the output
    assert not (tmp_path / "cache").exists()


def test_a_pipeline_on_a_scheme_without_a_file_system_stops_before_ray(tmp_path, monkeypatch, no_ray):
    monkeypatch.setenv("GREENCODE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert refused_pipeline("foo://bucket/run").startswith("error: foo://bucket/run: no file system for foo://")
    assert not list(tmp_path.iterdir())


def test_a_shard_written_on_another_node_is_written_on_the_driver_from_its_bytes(tmp_path):
    from workflows.extract import keep_on_driver

    shard = tmp_path / "shards" / "shard-00000.parquet"
    keep_on_driver(str(shard), b"")  # written on the driver's node (or shared storage): nothing to do
    assert not shard.exists()
    keep_on_driver(str(shard), b"PAR1 bytes an actor returned")
    assert shard.read_bytes() == b"PAR1 bytes an actor returned"


def test_a_published_shard_dir_is_read_at_its_uri_and_digested_from_its_pointer(bucket, tmp_path):
    from greencode.digests import tree_digest
    from greencode.env import ExitEnv
    from greencode.shards import ShardError, build_table, list_shards, shard_path, write_shard
    from test_shards import META, toy_rows

    local = tmp_path / "shards"
    for i in range(2):
        write_shard(build_table(META, toy_rows(seed=i)), shard_path(local, i))
    uri = f"s3://{bucket}/run/shards/train"
    with pytest.raises(ShardError, match=f"{uri} is not published"):
        list_shards(uri)
    assert artifact_digest(uri) is None
    Store(f"s3://{bucket}/run").publish(local, "shards/train", tree_digest(local))
    assert artifact_digest(uri) == tree_digest(local) == artifact_digest(local)
    fetched = list_shards(uri)
    assert [p.name for p in fetched] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert fetched[0].is_relative_to(tmp_path / "cache")  # read from this host's fetch cache
    env = ExitEnv({"shards_dir": uri})  # what an env runner on another node is given
    assert len(env.data) == 12


def test_a_work_dir_on_object_storage_is_claimed_for_one_identity(bucket):
    from greencode.manifest import WORK_MARKER, StageIdentity, StaleWorkError, claim_work_dir

    uri = f"s3://{bucket}/run/tune/sweep/tune"
    mine = StageIdentity({"lr": 1e-3}, {"shards": "sha256:a"})
    assert claim_work_dir(uri, mine, "the Tune experiment") == uri
    assert json.loads(Store(uri).read_bytes(WORK_MARKER))["identity"] == mine.digest
    assert claim_work_dir(uri, mine, "the Tune experiment") == uri  # the same sweep resumes
    with pytest.raises(StaleWorkError, match=r"tune/sweep/tune holds the Tune experiment of another run \(.*lr"):
        claim_work_dir(uri, StageIdentity({"lr": 2e-3}, {"shards": "sha256:a"}), "the Tune experiment")
    other = f"s3://{bucket}/run/unrecorded"
    Store(other).write_bytes("experiment_state.json", b"{}")
    with pytest.raises(StaleWorkError, match="no record of the settings"):
        claim_work_dir(other, mine, "the Tune experiment")


def test_work_dirs_say_where_a_uri_is_taken_and_where_it_is_not():
    from greencode.config import ConfigError, LiteSweepConfig, PolicyTrainConfig, SweepConfig, validate

    sweep = validate(SweepConfig, {"storage_path": "s3://b/sweeps"})
    assert sweep.tune_storage_path == "s3://b/sweeps"  # trials on any node write Tune's experiment there
    assert validate(SweepConfig, {"storage_path": "runs/sweep"}).tune_storage_path is None
    with pytest.raises(ConfigError, match=r"storage_path: 's3://b/rllib' is a URI; give a local or shared path "
                                          r"\(RLlib checkpoints are written by the learner in this process\)"):
        validate(PolicyTrainConfig, {"storage_path": "s3://b/rllib"})
    with pytest.raises(ConfigError, match="storage_path: 's3://b/lite' is a URI"):
        validate(LiteSweepConfig, {"storage_path": "s3://b/lite"})
