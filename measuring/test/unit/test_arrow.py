"""
Tests for results sent as an Arrow IPC stream: ``results.arrow_stream`` reading a result that is
one Parquet file, a folder of Parquet parts, or CSV, whole or a slice; the dispatcher answering a
Job Result with ``"Format": "arrow"``; and the protocol writing the stream's raw bytes after its
answer line, holding back other lines until the client has read them.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pandas as pd
import pyarrow as pa
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from measuring.server import results
from measuring.server.protocol import RequestProtocol, Streamed
from measuring.test.support import sample_frame, write_dataset, write_formulas, write_parts
from measuring.test.unit.test_dispatch import Harness
from measuring.wire import ARROW_STREAM


def read_stream(meta: dict[str, Any], body: Any) -> pd.DataFrame:
    """The table in an Arrow stream file, checked to be ``Bytes`` long."""
    with body:
        data = body.read()
    self_size = len(data)
    assert self_size == meta["Bytes"], (self_size, meta["Bytes"])
    return pa.ipc.open_stream(data).read_all().to_pandas()


class FullTransport(StringTransport):
    """A transport whose buffer fills: past ``limit`` unsent bytes it pauses its producer."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.unsent, self.paused = limit, 0, False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unsent += len(data)
        if self.unsent > self.limit and not self.paused and self.producer is not None:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self, protocol: RequestProtocol) -> None:
        """The client read all that was sent: resume the producer."""
        self.unsent, self.paused = 0, False
        protocol.resumeProducing()


class ArrowStreamTests(SynchronousTestCase):
    """``arrow_stream``: the result's rows as Arrow, with what the answer line says of them."""

    def setUp(self) -> None:
        self.folder = os.path.realpath(self.mktemp())
        os.makedirs(self.folder)
        self.frame = sample_frame(5_000)
        self.frame["sensor"] = self.frame["sensor"].astype("category")

    def test_file(self) -> None:
        """A Parquet file, whole: equal to what pandas reads, with the answer's fields."""
        write_dataset(self.folder, "r.parquet", self.frame, row_group_size=700)
        meta, body = results.arrow_stream(self.folder, "r.parquet", 0, None)
        table = read_stream(meta, body)
        pd.testing.assert_frame_equal(
            table, pd.read_parquet(os.path.join(self.folder, "r.parquet"))
        )
        self.assertEqual(
            {key: value for key, value in meta.items() if key != "Bytes"},
            {"File": "r.parquet", "Rows": 5_000, "Offset": 0, "Count": 5_000,
             "Columns": ["time", "sensor", "value"], "Format": "arrow", "MediaType": ARROW_STREAM},
        )  # fmt: skip

    def test_slices(self) -> None:
        """Offset and Limit cut the rows across row groups, and past the end."""
        write_dataset(self.folder, "r.parquet", self.frame, row_group_size=700)
        whole = pd.read_parquet(os.path.join(self.folder, "r.parquet"))
        for offset, limit in [(0, 1), (650, 100), (699, 1402), (4_990, 100), (6_000, 5), (3, None)]:
            meta, body = results.arrow_stream(self.folder, "r.parquet", offset, limit)
            stop = None if limit is None else offset + limit
            expected = whole.iloc[offset:stop].reset_index(drop=True)
            # With no row at all, no category is sent either.
            pd.testing.assert_frame_equal(
                read_stream(meta, body), expected, check_categorical=bool(len(expected))
            )
            self.assertEqual((meta["Rows"], meta["Count"]), (5_000, len(expected)))

    def test_folderOfParts(self) -> None:
        """A result folder of Parquet parts reads in their natural order (part.2 before part.10)."""
        parts = os.path.join(self.folder, "r.parquet")
        os.makedirs(parts)
        for number in range(12):
            chunk = self.frame.iloc[number * 400 : (number + 1) * 400]
            write_dataset(parts, f"part.{number}.parquet", chunk.reset_index(drop=True))
        open(os.path.join(parts, "_SUCCESS"), "w").close()
        meta, body = results.arrow_stream(self.folder, "r.parquet", 0, None)
        table = read_stream(meta, body)
        expected = self.frame.iloc[: 12 * 400].reset_index(drop=True)
        pd.testing.assert_frame_equal(table, expected, check_categorical=False)
        self.assertEqual(meta["Rows"], 4_800)

    def test_csv(self) -> None:
        """A CSV result comes as Arrow too (types as the CSV reader sees them)."""
        self.frame.head(50).to_csv(os.path.join(self.folder, "r.csv"), index=False)
        meta, body = results.arrow_stream(self.folder, "r.csv", 10, 5)
        table = read_stream(meta, body)
        self.assertEqual((meta["Rows"], meta["Count"], len(table)), (50, 5, 5))
        self.assertEqual(list(table["value"]), list(self.frame["value"].iloc[10:15]))


class ArrowAnswerTests(SynchronousTestCase):
    """A done job's table asked for as Arrow: an answer line, then exactly its stream."""

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        write_parts(self.root)
        write_formulas(self.root)
        self.harness = Harness(self, (self.root,))
        self.protocol = RequestProtocol(self.harness.dispatcher, 1 << 20)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(
            b'{"Header":"Dask","Request":{"Directory":".","Base":"data.parquet",'
            b'"File":"work.py","Async":true}}\n'
        )
        [run] = self.harness.pool.runs
        self.job = run.message["Job"]
        folder = os.path.join(self.root, "results", self.job)
        os.makedirs(folder)
        write_dataset(folder, "mean_by_sensor.parquet", sample_frame(40_000))
        run.succeed({"mean_by_sensor": {"Kind": "DataFrame", "Rows": 40_000}})
        self.transport.clear()

    def ask(self, **fields: Any) -> None:
        request = {"Header": "Job", "Request": "Result", "Job": self.job,
                   "Name": "mean_by_sensor", **fields}  # fmt: skip
        self.protocol.dataReceived(json.dumps(request).encode() + b"\n")

    def test_lineThenStream(self) -> None:
        """The header line, the stream's bytes, and the next answer's line after them."""
        self.ask(Format="arrow", Id=1)
        self.protocol.dataReceived(b'{"Header":"Info","Request":"Status","Id":2}\n')
        data = io.BytesIO(self.transport.value())
        header = json.loads(data.readline())
        self.assertEqual((header["Status"], header["Id"]), ("OK", 1))
        response = header["Response"]
        self.assertEqual((response["Name"], response["Kind"], response["Rows"]),
                         ("mean_by_sensor", "DataFrame", 40_000))  # fmt: skip
        table = pa.ipc.open_stream(data.read(response["Bytes"])).read_all()
        self.assertEqual(table.num_rows, 40_000)
        self.assertEqual(json.loads(data.readline())["Id"], 2)
        self.assertEqual(data.read(), b"")

    def test_linesWaitForTheStream(self) -> None:
        """The stream goes as the client reads it; the next answer comes only after it."""
        transport = FullTransport(limit=64 * 1024)
        self.protocol.makeConnection(transport)
        self.ask(Format="arrow", Id=1)
        self.protocol.dataReceived(b'{"Header":"Info","Request":"Status","Id":2}\n')
        header = json.loads(io.BytesIO(transport.value()).readline())
        size = header["Response"]["Bytes"]
        self.assertGreater(size, 3 * 256 * 1024)
        sizes = [len(transport.value())]
        while transport.paused:
            transport.drain(self.protocol)
            sizes.append(len(transport.value()))
        self.assertGreater(len(sizes), 3, "the stream was written in one go")
        data = io.BytesIO(transport.value())
        data.readline()
        self.assertEqual(pa.ipc.open_stream(data.read(size)).read_all().num_rows, 40_000)
        self.assertEqual(json.loads(data.readline())["Id"], 2)

    def test_badFormat(self) -> None:
        """Another Format is BadRequest naming those there are."""
        self.ask(Format="parquet", Id=1)
        answer = json.loads(self.transport.value())
        self.assertEqual(answer["Error"]["Code"], "BadRequest")
        self.assertIn('"Format" must be one of "json", "arrow"', answer["Error"]["Message"])

    def test_closedConnectionClosesTheStream(self) -> None:
        """A stream for a connection that is gone is closed, not sent."""
        body = io.BytesIO(b"x" * 10)
        self.protocol.connectionLost()
        self.protocol._stream(Streamed({}, body, 10))
        self.assertTrue(body.closed)
