"""Hidden-state shards: what the exit environment replays instead of running the LLM.

One Parquet row per *generated* token (METHOD §3). For generated token ``t`` of a
sample the observation is the hidden state at the position that *predicts* it
(``len(context) + t - 1``) after every exit point, so the policy sees exactly what
the gate sees at inference time. Columns:

===================  =====================================  ==========================================
column               type                                   meaning
===================  =====================================  ==========================================
sample_id            string                                 the sample (episode) this token belongs to
token_index          int32                                  t, 0-based position among generated tokens
hidden               fixed_size_list<float16|32>[n * H]     hidden state at each of the n exit points
exit_predictions     fixed_size_list<int32>[n]              argmax of decode(hidden) at each exit point
final_token          int32                                  y: the token the full model generated
dataset_token        int32                                  the corpus token at that position (-1 past the end)
optimal_exit         int32                                  first exit index whose prediction == y; n = final layer
exit_features        fixed_size_list<float32>[n * F]        only with ``features``: the translated exit's own
                                                            confidence at each exit point (greencode/confidence.py)
===================  =====================================  ==========================================

The Parquet key-value metadata ``greencode.shard`` (JSON) carries the schema
version, exit points, hidden size, number of layers, model fingerprint and hidden
dtype; :func:`read_shard` checks all of it and names the file and the problem when
a shard is corrupt or comes from another model. Shards are written to a temp file
and renamed, so a file that exists is complete (extraction resumes by skipping them).
Running the model to fill them is greencode.extraction's job; this module is the format.
A shard dir may also be a URI of a dir published on object storage (greencode.storage): readers on
any node fetch it once per host, so PPO env runners and Tune trials need no disk shared with the driver.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from greencode.atomic import atomic_path
from greencode.storage import is_uri, local_copy

SCHEMA_VERSION = 1
METADATA_KEY = b"greencode.shard"
SHARD_GLOB = "shard-*.parquet"
_HIDDEN_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
_NUMPY_HIDDEN = {"float16": np.float16, "float32": np.float32}


class ShardError(ValueError):
    """A shard file is missing, corrupt, or does not match the other shards / the model."""


@dataclass(frozen=True)
class ShardMeta:
    exit_points: list[int]
    hidden_size: int
    num_layers: int
    model_fingerprint: str
    hidden_dtype: str = "float16"
    schema_version: int = SCHEMA_VERSION
    features: tuple[str, ...] = ()  # what the policy observes besides the hidden state (greencode/confidence.py)
    feature_shortlist: int = 0  # token ids the features' softmax runs over

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))  # JSON gives a list

    @property
    def num_exits(self) -> int:
        return len(self.exit_points)

    @property
    def observation_size(self) -> int:
        """What the policy reads per exit: the hidden state, then the features."""
        return self.hidden_size + len(self.features)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    def compatible_key(self) -> tuple:
        """What two shards must share to be replayed together (dtype may differ)."""
        return (tuple(self.exit_points), self.hidden_size, self.num_layers, self.model_fingerprint, self.features,
                self.feature_shortlist)


def shard_schema(meta: ShardMeta) -> pa.Schema:
    n, h = meta.num_exits, meta.hidden_size
    features = [("exit_features", pa.list_(pa.float32(), n * len(meta.features)))] if meta.features else []
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("token_index", pa.int32()),
            ("hidden", pa.list_(_HIDDEN_TYPES[meta.hidden_dtype], n * h)),
            ("exit_predictions", pa.list_(pa.int32(), n)),
            ("final_token", pa.int32()),
            ("dataset_token", pa.int32()),
            ("optimal_exit", pa.int32()),
            *features,
        ],
        metadata={METADATA_KEY: meta.to_json()},
    )


@dataclass
class ShardData:
    """Columns of one or more shards as numpy arrays (rows grouped by sample, in token order)."""

    meta: ShardMeta
    sample_id: np.ndarray  # [N] object (str)
    token_index: np.ndarray  # [N] int32
    hidden: np.ndarray  # [N, n_exits, H] float16/float32
    exit_predictions: np.ndarray  # [N, n_exits] int32
    final_token: np.ndarray  # [N] int32
    dataset_token: np.ndarray  # [N] int32
    optimal_exit: np.ndarray  # [N] int32, n_exits = final layer
    exit_features: np.ndarray | None = None  # [N, n_exits, F] float32 when meta.features

    def observations(self) -> np.ndarray:
        """[N, n_exits, observation_size] float32: what the policy reads at each exit of each token."""
        hidden = self.hidden.astype(np.float32)
        return hidden if self.exit_features is None else np.concatenate([hidden, self.exit_features], axis=-1)

    def __len__(self) -> int:
        return len(self.token_index)

    def episode_bounds(self) -> np.ndarray:
        """[E, 2] (start, stop) row ranges, one per sample (= one episode)."""
        n = len(self)
        if n == 0:
            return np.zeros((0, 2), dtype=np.int64)
        changes = np.flatnonzero(self.sample_id[1:] != self.sample_id[:-1]) + 1
        starts = np.concatenate([[0], changes])
        stops = np.concatenate([changes, [n]])
        return np.stack([starts, stops], axis=1)

    def exit_layers(self) -> np.ndarray:
        """1-based layer of each exit index (exit points + the final layer)."""
        return np.array([*self.meta.exit_points, self.meta.num_layers], dtype=np.int64)


def build_table(meta: ShardMeta, rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the column names; ``hidden`` as [n_exits, H] arrays) -> a validated table."""
    n, h = meta.num_exits, meta.hidden_size
    with np.errstate(over="ignore"):  # overflow is reported below, with a fix
        dtype = _NUMPY_HIDDEN[meta.hidden_dtype]
        hidden = np.stack([np.asarray(r["hidden"], dtype=dtype) for r in rows]) if rows else np.zeros((0, n, h), dtype)
    if hidden.shape[1:] != (n, h):
        raise ShardError(f"hidden rows have shape {hidden.shape[1:]}, expected ({n}, {h})")
    if not np.isfinite(hidden).all():
        raise ShardError(f"hidden states overflow {meta.hidden_dtype} (inf/nan): extract with hidden_dtype=float32")
    schema = shard_schema(meta)
    hidden_type = schema.field("hidden").type.value_type
    flat_hidden = pa.FixedSizeListArray.from_arrays(pa.array(hidden.reshape(-1), type=hidden_type), n * h)
    preds = np.asarray([r["exit_predictions"] for r in rows], dtype=np.int32).reshape(-1)
    columns = {
        "sample_id": pa.array([str(r["sample_id"]) for r in rows], pa.string()),
        "token_index": pa.array([r["token_index"] for r in rows], pa.int32()),
        "hidden": flat_hidden,
        "exit_predictions": pa.FixedSizeListArray.from_arrays(pa.array(preds, pa.int32()), n),
        "final_token": pa.array([r["final_token"] for r in rows], pa.int32()),
        "dataset_token": pa.array([r["dataset_token"] for r in rows], pa.int32()),
        "optimal_exit": pa.array([r["optimal_exit"] for r in rows], pa.int32()),
    }
    if meta.features:
        f = len(meta.features)
        feats = np.stack([np.asarray(r["exit_features"], np.float32) for r in rows]) if rows else np.zeros((0, n, f))
        if feats.shape[1:] != (n, f):
            raise ShardError(f"exit_features rows have shape {feats.shape[1:]}, expected ({n}, {f})")
        columns["exit_features"] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), pa.float32()), n * f)
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def write_shard(table: pa.Table, path: str | Path) -> Path:
    """Write atomically: temp file in the same directory, then rename."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_meta(path: str | Path) -> ShardMeta:
    """The shard's metadata, checked; raises ShardError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard not found: {path}")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"{path} is not a readable Parquet file: {err}") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ShardError(f"{path} is not a GreenCode shard (no {METADATA_KEY.decode()} metadata)")
    try:
        meta = ShardMeta(**json.loads(raw))
    except (TypeError, ValueError) as err:
        raise ShardError(f"{path} has unreadable shard metadata: {err}") from None
    if meta.schema_version != SCHEMA_VERSION:
        raise ShardError(f"{path} has shard schema version {meta.schema_version}; this GreenCode reads "
                         f"{SCHEMA_VERSION}: re-extract")
    if meta.hidden_dtype not in _HIDDEN_TYPES:
        raise ShardError(f"{path} stores hidden states as {meta.hidden_dtype!r}; "
                         f"expected one of {sorted(_HIDDEN_TYPES)}")
    expected = shard_schema(meta)
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        raise ShardError(f"{path} columns do not match schema v{SCHEMA_VERSION}: got {schema.remove_metadata()}, "
                         f"expected {expected.remove_metadata()}")
    return meta


def _first_bad_row(table: pa.Table, name: str) -> tuple[int, str] | None:
    """(row, problem) of the first null in column ``name`` (or inside one of its lists) or, for the
    hidden states, the first NaN/inf; None when the column is clean."""
    import pyarrow.compute as pc

    column = table.column(name).combine_chunks()
    bad = np.asarray(pc.is_null(column), dtype=bool)
    problem = "null"
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        values = column.flatten() if column.null_count == 0 else column.fill_null([0] * width).flatten()
        inner = np.asarray(pc.is_null(values), dtype=bool).reshape(-1, width).any(axis=1)
        if name in ("hidden", "exit_features") and not bad.any() and not inner.any():
            finite = np.isfinite(values.to_numpy(zero_copy_only=False)).reshape(-1, width).all(axis=1)
            bad, problem = ~finite, f"NaN or inf in the {'hidden states' if name == 'hidden' else name}"
        else:
            bad |= inner
    rows = np.flatnonzero(bad)
    return (int(rows[0]), problem) if len(rows) else None


def check_values(table: pa.Table, path: str | Path) -> None:
    """Reject nulls anywhere and non-finite hidden states, naming the file, the row and the column:
    one NaN would poison every PPO update that samples it."""
    for name in table.column_names:
        found = _first_bad_row(table, name)
        if found is not None:
            row, problem = found
            raise ShardError(f"{path}: row {row}, column {name}: {problem}; the shard is corrupt or was not "
                             "written by greencode extract: delete it and re-extract")


def read_shard(path: str | Path) -> ShardData:
    meta = read_meta(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"{path} is corrupt: {err}") from None
    check_values(table, path)
    n, h = meta.num_exits, meta.hidden_size
    rows = table.num_rows

    def flat(name: str) -> np.ndarray:
        return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)

    data = ShardData(
        meta=meta,
        sample_id=np.asarray(table.column("sample_id").to_pylist(), dtype=object),
        token_index=table.column("token_index").to_numpy(),
        hidden=flat("hidden").reshape(rows, n, h),
        exit_predictions=flat("exit_predictions").reshape(rows, n),
        final_token=table.column("final_token").to_numpy(),
        dataset_token=table.column("dataset_token").to_numpy(),
        optimal_exit=table.column("optimal_exit").to_numpy(),
        exit_features=flat("exit_features").reshape(rows, n, len(meta.features)) if meta.features else None,
    )
    if rows and (data.optimal_exit.min() < 0 or data.optimal_exit.max() > n):
        raise ShardError(f"{path}: optimal_exit outside 0..{n}")
    return data


def shard_path(directory: str | Path, index: int) -> Path:
    """Where shard number ``index`` of a directory lives (the names :func:`list_shards` finds)."""
    return Path(directory) / f"shard-{index:05d}.parquet"


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a readable shard (written whole: shards are renamed into place)."""
    try:
        read_meta(path)
        return True
    except ShardError:
        return False


def list_shards(directory: str | Path) -> list[Path]:
    """The shard files of a local dir, or of a published dir on object storage (fetched once per host)."""
    if is_uri(directory):
        try:
            directory = local_copy(directory)
        except FileNotFoundError as err:
            raise ShardError(f"{err} (write it with the pipeline's extract stage)") from None
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"shard directory not found: {directory} (write it with `greencode extract --set "
                         f"output_dir={directory}`)")
    paths = sorted(directory.glob(SHARD_GLOB))
    if not paths:
        raise ShardError(f"no shards ({SHARD_GLOB}) in {directory}: run `greencode extract` first")
    return paths


def load_shards(paths: Iterable[str | Path]) -> ShardData:
    """Read and concatenate shards that come from the same model and exit points."""
    paths = list(paths)
    if not paths:
        raise ShardError("no shard paths given")
    parts = [read_shard(p) for p in paths]
    first = parts[0].meta
    for path, part in zip(paths, parts):
        if part.meta.compatible_key() != first.compatible_key():
            raise ShardError(f"{path} comes from another model or exit points ({part.meta}) than {paths[0]} ({first})")
    names = ["sample_id", "token_index", "hidden", "exit_predictions", "final_token", "dataset_token", "optimal_exit"]
    return ShardData(meta=first, **{name: np.concatenate([getattr(p, name) for p in parts])
                                    for name in names + (["exit_features"] if first.features else [])})


def check_shards(directory: str | Path) -> ShardMeta:
    """Read every shard of ``directory`` once, one at a time (values included), and check that they
    belong together: bad shards fail here with the file, row and column, before any worker starts."""
    paths = list_shards(directory)
    first = read_shard(paths[0]).meta
    for path in paths[1:]:
        meta = read_shard(path).meta
        if meta.compatible_key() != first.compatible_key():
            raise ShardError(f"{path} comes from another model or exit points ({meta}) than {paths[0]} ({first})")
    return first
