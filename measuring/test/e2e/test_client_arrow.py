"""
Results fetched through the server as an Arrow IPC stream (Job Result with ``"Format":
"arrow"``): equal to the result file, dtypes included (times with their zone, categories,
strings); the connection carries on with JSON lines after the stream; and a client without
pyarrow still gets its tables, as JSON pages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, ClassVar

import pandas as pd
import pyarrow as pa

from measuring.client import Client
from measuring.test.support import PATIENCE, STATUS, ServerTestCase, environment
from measuring.wire import ARROW_STREAM

TYPED = "typed.parquet"
FORMULAS = """
def table(df):
    return df


def by_site(df):
    return df.groupby("site", observed=True).value.mean()


def per_hour(df):
    return df.set_index("time", sorted=True).value.resample("1h").max()
"""


def typed_frame(rows: int = 30_000) -> pd.DataFrame:
    """Times in a zone, a category, strings with gaps, whole numbers, floats with NaN, booleans."""
    import numpy as np

    rng = np.random.default_rng(7)
    frame = pd.DataFrame(
        {
            "time": pd.date_range("2026-03-28", periods=rows, freq="10s", tz="Europe/Paris"),
            "site": pd.Categorical(rng.choice(["north", "south", "east"], rows)),
            "note": rng.choice(["", "calibrated", "spike", None], rows),
            "count": rng.integers(0, 1000, rows),
            "value": rng.normal(20.0, 5.0, rows),
            "ok": rng.random(rows) > 0.5,
        }
    )
    frame.loc[frame.index[::101], "value"] = float("nan")
    return frame


class ArrowTests(ServerTestCase):
    """``Result.to_pandas`` over an Arrow stream, and the stream on the wire."""

    formulas: ClassVar[dict[str, str]] = {"typed.py": FORMULAS}

    def setUp(self) -> None:
        super().setUp()
        typed_frame().to_parquet(os.path.join(self.folder, TYPED), row_group_size=7_000)

    def run_job(self, client: Client) -> Any:
        return client.run(self.folder, TYPED, "typed.py")

    def test_equalToTheFile(self) -> None:
        """Every result fetched as Arrow equals the file as pandas reads it, dtypes and all."""
        server = self.start()
        with Client("127.0.0.1", server.port) as client:
            job = self.run_job(client)
            for name, result in job.results.items():
                from_file = result.to_pandas(source="file")
                fetched = result.to_pandas(source="arrow")
                if isinstance(from_file, pd.Series):
                    pd.testing.assert_series_equal(fetched, from_file, obj=name)
                else:
                    pd.testing.assert_frame_equal(fetched, from_file, obj=name)
            table = job.results["table"].to_pandas(source="arrow")
            self.assertRegex(str(table["time"].dtype), r"^datetime64\[\w+, Europe/Paris\]$")
            self.assertIsInstance(table["site"].dtype, pd.CategoricalDtype)
            self.assertTrue(pd.api.types.is_string_dtype(table["note"].dtype))
            self.assertEqual(len(table), 30_000)

    def test_streamOnTheWire(self) -> None:
        """A header line with the stream's size, the stream, then JSON lines again."""
        server = self.start()
        with Client("127.0.0.1", server.port) as client:
            job = self.run_job(client).id
        expected = pd.read_parquet(os.path.join(self.folder, "results", job, "table.parquet"))
        with server.connect() as connection:
            request = {"Header": "Job", "Request": "Result", "Job": job, "Name": "table",
                       "Format": "arrow", "Offset": 100, "Limit": 9_000, "Id": 5}  # fmt: skip
            header = connection.ask(request)
            response = header["Response"]
            self.assertEqual((header["Status"], header["Id"]), ("OK", 5))
            self.assertEqual(
                {key: response[key] for key in ("Format", "MediaType", "Rows", "Offset", "Count")},
                {"Format": "arrow", "MediaType": ARROW_STREAM, "Rows": 30_000, "Offset": 100,
                 "Count": 9_000},
            )  # fmt: skip
            stream = connection._file.read(response["Bytes"])
            self.assertEqual(connection.ask(STATUS)["Status"], "OK")
        table = pa.ipc.open_stream(stream).read_all().to_pandas()
        pd.testing.assert_frame_equal(table, expected.iloc[100:9_100].reset_index(drop=True))

    def test_withoutPyarrow(self) -> None:
        """A client where pyarrow cannot be imported gets the same table through JSON pages."""
        server = self.start()
        with Client("127.0.0.1", server.port) as client:
            job = self.run_job(client).id
        program = f"""
import json, sys
sys.modules["pyarrow"] = None  # importing pyarrow now fails, as when it is not installed
from measuring.client import Client
with Client("127.0.0.1", {server.port}) as client:
    sent = []
    client.record = lambda request, line: sent.append(request.get("Format", "json"))
    frame = client.job({job!r}).results["table"].to_pandas(source="server")
    by_site = client.job({job!r}).results["by_site"].to_pandas(source="server")
print(json.dumps({{"rows": len(frame), "time": str(frame["time"].dtype),
                  "formats": sorted(set(sent)), "pyarrow": "pyarrow" in sys.modules
                  and sys.modules["pyarrow"] is not None, "sites": sorted(by_site.index)}}))
"""
        done = subprocess.run(
            [sys.executable, "-c", program], env=environment(), capture_output=True, text=True,
            timeout=PATIENCE,
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(
            json.loads(done.stdout),
            {"rows": 30_000, "time": "datetime64[us, Europe/Paris]", "formats": ["json"],
             "pyarrow": False, "sites": ["east", "north", "south"]},
        )  # fmt: skip
