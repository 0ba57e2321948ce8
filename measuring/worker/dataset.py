"""
Runs in the worker process: a job's Parquet dataset as a Dask DataFrame of partitions sized for
the job, read with either engine, indexed by a column when the job asks.

The dataset's row groups (from the files' footers, nothing else is read) are grouped into
partitions of the size ``budget`` gives the job's memory and threads: small files are combined,
and every partition is a run of whole row groups. Partitions are read by ``dd.from_map``, which
takes a column projection into the read and never fuses partitions back together. An index
column gets divisions from the row groups' statistics when they show it sorted. Never imports
twisted or ``measuring.server``; dask, pandas and pyarrow are imported inside the functions.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from measuring import storage
from measuring.errors import JobFailed, NotFound
from measuring.files import data_files

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as pds

#: A partition holds about this much memory at most, whatever the job's memory allows...
MOST_PARTITION = 256 * 2**20
#: ...and at least this much (or one row group), however little memory the job has.
LEAST_PARTITION = 4 * 2**20
#: Data is not cut finer than this only to give every thread partitions to work on.
PARALLEL_PARTITION = 16 * 2**20
#: A job's memory per thread over the size of the partition it works on: what reading,
#: converting, computing and writing one partition take at once, measured (docs/performance.md).
WORKING_SET = 6
#: What each thread holds whatever its partition's size: the Arrow and malloc pools' memory kept
#: for reuse, the Parquet writer's buffers (measured: 70 to 85 MiB writing, 20 to 35 reducing).
PER_THREAD = 80 * 2**20
#: Partitions per thread, at least, when the dataset is large enough: the threads stay busy to
#: the end instead of waiting for the last large partition.
PARTITIONS_PER_THREAD = 4
#: Rows read from the first row group to learn how much memory a text column takes per row.
SAMPLE_ROWS = 65_536
PARQUET_ENDINGS = (".parquet", ".parq", ".pq")


@dataclass(frozen=True)
class RowGroup:
    """One row group of one file: where it is, its rows, its estimated memory, its index range."""

    file: str
    id: int
    rows: int
    bytes: int
    low: Any = None
    high: Any = None


@dataclass(frozen=True)
class Partition:
    """The row groups one partition reads, in order."""

    groups: tuple[RowGroup, ...]

    @property
    def rows(self) -> int:
        return sum(group.rows for group in self.groups)

    @property
    def bytes(self) -> int:
        return sum(group.bytes for group in self.groups)


@dataclass(frozen=True)
class Budget:
    """How a job uses its memory: how many threads, each working on a partition of how much."""

    threads: int
    partition: int


def budget(memory: int | None, threads: int, baseline: int = 0) -> Budget:
    """
    The threads and the partition size for a job of ``memory`` bytes (None: no limit) that may
    use ``threads`` threads, beside the ``baseline`` the worker process holds already.

    Each thread holds ``PER_THREAD`` and ``WORKING_SET`` times its partition; when the memory
    cannot give every thread a partition of ``LEAST_PARTITION``, fewer threads work (one at
    least), each on a larger partition.
    """
    threads = max(threads, 1)
    if memory is None:
        return Budget(threads, MOST_PARTITION)
    free = memory - baseline
    while threads > 1 and free - threads * PER_THREAD < threads * WORKING_SET * LEAST_PARTITION:
        threads -= 1
    share = (free - threads * PER_THREAD) // (threads * WORKING_SET)
    return Budget(threads, max(LEAST_PARTITION, min(MOST_PARTITION, share)))


def plan(
    groups: Sequence[RowGroup], most: int, threads: int, sorted_index: bool = False
) -> list[Partition]:
    """
    Row groups, in order, grouped into partitions of at most ``most`` bytes (one row group at
    least), smaller when that gives each of ``threads`` threads ``PARTITIONS_PER_THREAD`` of them
    (but not below ``PARALLEL_PARTITION``).

    With ``sorted_index``, a row group whose index starts where the one before ends stays in the
    same partition, so that no index value is on both sides of a division.
    """
    total = sum(group.bytes for group in groups)
    wanted = math.ceil(total / (max(threads, 1) * PARTITIONS_PER_THREAD))
    size = min(most, max(PARALLEL_PARTITION, wanted))
    partitions: list[Partition] = []
    current: list[RowGroup] = []
    held = 0
    for group in groups:
        touching = sorted_index and current and not current[-1].high < group.low
        if current and held + group.bytes > size and not touching:
            partitions.append(Partition(tuple(current)))
            current, held = [], 0
        current.append(group)
        held += group.bytes
    if current:
        partitions.append(Partition(tuple(current)))
    return partitions


def parquet_files(path: str, fs: Any = None) -> list[str]:
    """
    The data files of a Parquet file or folder (on the fsspec file system ``fs``, as URLs, when
    given), in the order Dask takes them (``part.2`` before ``part.10``): names starting with
    ``_`` or ``.`` skipped, as pyarrow does, and only those with a Parquet ending when some have
    one.
    """
    from dask.utils import natural_sort_key

    if fs is not None:
        found = storage.data_files(fs, path) if fs.isdir(path) else [path]
    elif not os.path.isdir(path):
        return [path]
    else:
        found = data_files(path)
    parquet = [name for name in found if name.endswith(PARQUET_ENDINGS)]
    return sorted(parquet or found, key=natural_sort_key)


@dataclass
class Source:
    """A dataset's files as pyarrow sees them: schema, fragments and the index the file keeps."""

    path: str
    dataset: pds.Dataset
    fragments: dict[str, pds.ParquetFileFragment]
    stored_index: list[str]
    #: On object storage: the fsspec file system (``path`` and the fragments' paths are then
    #: its keys, ``bucket/prefix/...``), and pyarrow's view of it; None for local files.
    fsspec: Any = None
    filesystem: Any = None

    @classmethod
    def open(cls, path: str) -> Source:
        import pyarrow.dataset as pds

        fs = filesystem = None
        if storage.is_url(path):
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            fs = storage.filesystem(path)
            filesystem = PyFileSystem(FSSpecHandler(fs))
            files = [fs._strip_protocol(url) for url in parquet_files(path, fs)]
            path = fs._strip_protocol(path).rstrip("/")
            root = path if fs.isdir(path) else None
        else:
            files = parquet_files(path)
            root = path if os.path.isdir(path) else None
        partitioning = (
            pds.HivePartitioning.discover(infer_dictionary=True) if root is not None else None
        )
        dataset = pds.dataset(
            files,
            format="parquet",
            partitioning=partitioning,
            partition_base_dir=root,
            filesystem=filesystem,
        )
        fragments = {fragment.path: fragment for fragment in dataset.get_fragments()}
        return cls(path, dataset, fragments, _stored_index(dataset.schema), fs, filesystem)

    @property
    def is_folder(self) -> bool:
        """Whether the dataset is a folder of files (not one file)."""
        if self.fsspec is not None:
            return bool(self.fsspec.isdir(self.path))
        return os.path.isdir(self.path)

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    @property
    def columns(self) -> list[str]:
        """The data columns (not the index the file keeps)."""
        return [name for name in self.schema.names if name not in self.stored_index]

    def row_groups(self, index: str | None) -> list[RowGroup]:
        """Every row group, its memory estimated, with the range of ``index`` from statistics."""
        widths = _row_widths(self)
        groups = []
        for path, fragment in self.fragments.items():
            for info in fragment.row_groups:
                stats = (info.statistics or {}).get(index) if index is not None else None
                low, high = (stats.get("min"), stats.get("max")) if stats else (None, None)
                groups.append(
                    RowGroup(path, info.id, info.num_rows, int(info.num_rows * widths), low, high)
                )
        return groups


def _stored_index(schema: pa.Schema) -> list[str]:
    """The columns pandas wrote its index into (``time``, ``__index_level_0__``), if any."""
    metadata = schema.pandas_metadata or {}
    return [name for name in metadata.get("index_columns", []) if isinstance(name, str)]


def _row_widths(source: Source) -> float:
    """
    Bytes of memory one row takes, every column read: what fixed-width types say, and for
    texts and other variable types what a sample of the first rows takes in Arrow.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    width, variable = 0.0, []
    for field in source.schema:
        try:
            width += field.type.bit_width / 8 + 1 / 8
        except ValueError:
            variable.append(field.name)
    first = next(
        (
            (path, info.id)
            for path, f in source.fragments.items()
            for info in f.row_groups
            if info.num_rows
        ),
        None,
    )
    if not variable or first is None:
        return width
    physical = set(source.fragments[first[0]].physical_schema.names)
    sampled = [name for name in variable if name in physical]
    # Hive partition columns are dictionaries: an index a row.
    width += 8 * (len(variable) - len(sampled))
    if sampled:
        batches = pq.ParquetFile(first[0], filesystem=source.filesystem).iter_batches(
            batch_size=SAMPLE_ROWS, row_groups=[first[1]], columns=sampled, use_threads=False
        )
        sample = pa.Table.from_batches([next(batches)])
        width += sample.nbytes / max(sample.num_rows, 1)
    return width


def arrow_types(arrow: pa.DataType) -> Any:
    """The pandas dtype ``dd.read_parquet`` gives an Arrow type, or None for pandas' own."""
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_string(arrow) or pa.types.is_large_string(arrow):
        return pd.StringDtype("pyarrow")
    if pa.types.is_date(arrow) or pa.types.is_decimal(arrow):
        return pd.ArrowDtype(arrow)
    return None


class Reader:
    """
    Reads one partition (a run of row groups) into pandas; Dask passes the ``columns`` a job
    uses, so that nothing else is read.
    """

    def __init__(self, source: Source, engine: str, index: str | None, fastparquet: Any) -> None:
        self.source = source
        self.engine = engine
        self.index = index
        self._fastparquet = fastparquet

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        return (self.source.path, self.engine, self.index)

    def __call__(self, partition: Partition, columns: list[str] | None = None) -> pd.DataFrame:
        wanted = self._wanted(columns)
        if self.engine == "fastparquet":
            frame = self._read_fastparquet(partition, wanted)
        else:
            frame = self._read_pyarrow(partition, wanted)
        return self.shape(frame, columns)

    def _wanted(self, columns: list[str] | None) -> list[str] | None:
        """What to read from the files: the projection, the index, and the index pandas kept."""
        if columns is None:
            return None
        wanted = {*columns, *self.source.stored_index, *([self.index] if self.index else [])}
        return [name for name in self.source.schema.names if name in wanted]

    def _read_pyarrow(self, partition: Partition, wanted: list[str] | None) -> pd.DataFrame:
        import pyarrow as pa

        tables = [
            self.source.fragments[path]
            .subset(row_group_ids=ids)
            .to_table(schema=self.source.schema, columns=wanted, use_threads=False)
            for path, ids in _by_file(partition)
        ]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return table.to_pandas(types_mapper=arrow_types, use_threads=False)

    def _read_fastparquet(self, partition: Partition, wanted: list[str] | None) -> pd.DataFrame:
        import pandas as pd

        parquet, where = self._fastparquet
        columns = (
            None
            if wanted is None
            else [name for name in wanted if name not in self.source.stored_index]
        )
        runs: list[list[int]] = []
        for position in (where[(group.file, group.id)] for group in partition.groups):
            if runs and runs[-1][-1] + 1 == position:
                runs[-1].append(position)
            else:
                runs.append([position])
        frames = [parquet[run[0] : run[-1] + 1].to_pandas(columns=columns) for run in runs]
        return frames[0] if len(frames) == 1 else pd.concat(frames)

    def shape(self, frame: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
        """The frame indexed by ``index`` (sorted within the partition), with ``columns``."""
        if self.index is not None and frame.index.name != self.index:
            if frame.index.name is not None:
                frame = frame.reset_index()
            frame = frame.set_index(self.index)
            if not frame.index.is_monotonic_increasing:
                frame = frame.sort_index(kind="stable")
        if columns is not None:
            frame = frame[columns]
        return frame


def _by_file(partition: Partition) -> list[tuple[str, list[int]]]:
    """The partition's row groups as runs of ascending row groups of one file each."""
    runs: list[tuple[str, list[int]]] = []
    for group in partition.groups:
        if runs and runs[-1][0] == group.file and runs[-1][1][-1] < group.id:
            runs[-1][1].append(group.id)
        else:
            runs.append((group.file, [group.id]))
    return runs


def _fastparquet_positions(source: Source) -> tuple[Any, dict[tuple[str, int], int]]:
    """A fastparquet view of the dataset and where each (file, row group) is in it."""
    import fastparquet

    files = list(source.fragments)
    root = source.path if source.is_folder else None
    parquet = fastparquet.ParquetFile(
        files if root is not None else files[0], root=root or "", fs=source.fsspec
    )
    where: dict[tuple[str, int], int] = {}
    counts: dict[str, int] = {}
    for position, group in enumerate(parquet.row_groups):
        relative = group.columns[0].file_path
        path = os.path.join(root, relative) if root is not None and relative else files[0]
        path = os.path.normpath(path)
        where[(path, counts.get(path, 0))] = position
        counts[path] = counts.get(path, 0) + 1
    normal = {os.path.normpath(path): path for path in files}
    return parquet, {(normal[path], i): position for (path, i), position in where.items()}


def in_index_order(
    groups: Sequence[RowGroup],
) -> list[RowGroup] | RowGroup | tuple[RowGroup, RowGroup]:
    """
    The row groups that hold rows, ordered by their index ranges when those do not overlap
    (ranges that only touch are fine); else the row group without statistics, or two that
    overlap.
    """
    held = [group for group in groups if group.rows]
    for group in held:
        if group.low is None or group.high is None:
            return group
    ordered = sorted(held, key=lambda group: (group.low, group.high))
    for before, after in itertools.pairwise(ordered):
        if after.low < before.high:
            return before, after
    return ordered


def _unsorted(index: str, found: RowGroup | tuple[RowGroup, RowGroup]) -> JobFailed:
    """What a job indexed by ``index`` is told when the files are not sorted by it."""
    fix = (
        f"sort the data by {index!r} once and write it back (sorting it in every job takes "
        f'several times as long as the job, and more memory), or leave out "Index" and '
        f"call set_index({index!r}) in the formula"
    )
    if isinstance(found, RowGroup):
        return JobFailed(
            f"cannot index the dataset by {index!r}: row group {found.id} of "
            f"{os.path.basename(found.file)} has no statistics for it, so its range is unknown; "
            f"write the files with statistics (pandas and pyarrow do by default)"
        )
    one, other = found
    return JobFailed(
        f"the dataset is not sorted by {index!r}: its values in row group {one.id} of "
        f"{os.path.basename(one.file)} ({one.low} to {one.high}) and in row group {other.id} of "
        f"{os.path.basename(other.file)} ({other.low} to {other.high}) overlap; {fix}"
    )


def _divisions(source: Source, partitions: list[Partition], index: str) -> tuple[Any, ...]:
    """Partition bounds from the row groups' statistics (partitions in index order)."""
    import pandas as pd
    import pyarrow as pa

    values = [partition.groups[0].low for partition in partitions]
    values.append(max(group.high for group in partitions[-1].groups))
    field = source.schema.field(index)
    if pa.types.is_timestamp(field.type):
        stamps = pd.DatetimeIndex([pd.Timestamp(value) for value in values])
        zone = field.type.tz
        if zone is not None:
            stamps = (
                stamps.tz_convert(zone)
                if stamps.tz is not None
                else stamps.tz_localize("UTC").tz_convert(zone)
            )
        return tuple(stamps)
    return tuple(values)


def read_dataset(
    path: str,
    engine: str,
    index: str | None = None,
    partition: int = MOST_PARTITION,
    threads: int = 1,
) -> dd.DataFrame:
    """
    The Parquet file or folder at ``path`` as a Dask DataFrame read with ``engine``, in
    partitions of at most ``partition`` bytes of memory (``budget``), enough of them to
    keep ``threads`` threads busy.

    With ``index``, the frame is indexed by that column, its divisions known from the row
    groups' statistics (row groups whose ranges do not overlap are read in index order); when
    the files are not sorted by it, JobFailed says so. Without, an index the files keep (as
    pandas writes it) has divisions when the statistics show it sorted.
    """
    import dask.dataframe as dd

    source = Source.open(path)
    if index is not None and index not in source.schema.names:
        raise NotFound(
            f"the dataset has no column {index!r} to index by (its columns: "
            f"{', '.join(source.columns)})"
        )
    key = index if index is not None else _single(source.stored_index)
    groups = source.row_groups(key)
    ordered = in_index_order(groups) if key is not None else None
    if index is not None and not isinstance(ordered, list):
        assert ordered is not None
        raise _unsorted(index, ordered)
    sorted_index = isinstance(ordered, list)
    if isinstance(ordered, list):
        groups = ordered
    partitions = plan(groups, partition, threads, sorted_index)
    fastparquet = _fastparquet_positions(source) if engine == "fastparquet" else None
    reader = Reader(source, engine, index, fastparquet)
    meta = _meta(source, engine, index, fastparquet)
    if not partitions:
        return dd.from_pandas(meta, npartitions=1)
    divisions = (
        _divisions(source, partitions, key)
        if sorted_index and key is not None
        else (None,) * (len(partitions) + 1)
    )
    return dd.from_map(
        reader,
        partitions,
        meta=meta,
        divisions=divisions,
        enforce_metadata=False,
        label="read-parquet",
    )


def _single(names: list[str]) -> str | None:
    return names[0] if len(names) == 1 and not names[0].startswith("__index_level_") else None


def _meta(source: Source, engine: str, index: str | None, fastparquet: Any) -> pd.DataFrame:
    """The dataset's empty frame: its columns and dtypes as a partition has them."""
    if engine == "fastparquet":
        frame = fastparquet[0].head(0) if fastparquet[0].row_groups else None
        if frame is None:
            frame = source.schema.empty_table().to_pandas(types_mapper=arrow_types)
    else:
        frame = source.schema.empty_table().to_pandas(types_mapper=arrow_types)
    return Reader(source, engine, index, fastparquet).shape(frame)
