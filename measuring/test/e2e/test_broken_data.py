"""
End to end, a job over a damaged Parquet dataset: its JobFailed names the file that cannot be
read (and the row group, where the file's footer could be read), and says it is not readable
Parquet, with either engine, for a folder with one bad file and for a file whose footer is
garbled. (A file cut short is refused at submission: ``submission``.)

Each test starts the real ``twistd -n measuring`` (``support.ServerTestCase``).
"""

from __future__ import annotations

import os

from measuring.test.support import ServerTestCase
from measuring.test.unit.test_unreadable import flip_page, garble_footer, write
from measuring.wire import ENGINES


class BrokenParquetTests(ServerTestCase):
    """What a job over damaged files answers."""

    def failure(self, server: object, base: str, engine: str) -> str:
        answer = server.ask(self.dask("total", Base=base, Engine=engine))  # type: ignore[attr-defined]
        self.assertEqual(answer["Status"], "Error", answer)
        self.assertEqual(answer["Error"]["Code"], "JobFailed", answer)
        message: str = answer["Error"]["Message"]
        return message

    def test_oneBadFileInAFolder(self) -> None:
        """A folder of three files, one with a damaged page: the file and row group are named."""
        plant = os.path.join(self.folder, "plant")
        os.makedirs(plant)
        for n in range(3):
            write(os.path.join(plant, f"part.{n}.parquet"))
        flip_page(os.path.join(plant, "part.1.parquet"), 2)
        server = self.start()
        for engine in ENGINES:
            message = self.failure(server, "plant", engine)
            self.assertIn(
                "plant/part.1.parquet is not readable Parquet (row group 3 of 4)", message
            )

    def test_garbledFooter(self) -> None:
        """A file whose footer is there but garbled: it is named, its footer said unreadable."""
        write(os.path.join(self.folder, "garbled.parquet"))
        garble_footer(os.path.join(self.folder, "garbled.parquet"))
        server = self.start()
        for engine in ENGINES:
            message = self.failure(server, "garbled.parquet", engine)
            self.assertIn(
                "garbled.parquet is not readable Parquet (its footer cannot be read)", message
            )
