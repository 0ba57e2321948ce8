"""
End to end over TLS: the real ``twistd -n measuring`` with ``--port ssl:...`` and a self-signed
certificate made by the test, spoken to with Python's ``ssl`` module.

The server listens on its loopback TCP port (``LocalServer`` always adds it) and on the TLS port
named in its log. Each test starts its own server in its own folder (``support.ServerTestCase``);
cleanup checks that it stopped cleanly and left no process behind.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import ssl

import pandas as pd

from measuring.test.support import FORMULAS, PATIENCE, Connection, ServerTestCase

TLS_LISTENING = re.compile(r"measuring listening on 127\.0\.0\.1:(\d+) \(ssl:")


def write_self_signed(folder: str) -> tuple[str, str]:
    """A key and a certificate for 127.0.0.1 in ``folder``; returns their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "measuring.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = os.path.join(folder, "key.pem"), os.path.join(folder, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(key_path, 0o600)
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class TLSConnection(Connection):
    """A ``Connection`` over TLS, trusting what ``context`` trusts."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = PATIENCE) -> None:
        plain = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.socket = context.wrap_socket(plain, server_hostname="127.0.0.1")
        self._file = self.socket.makefile("rwb")


class TLSTests(ServerTestCase):
    """A server listening with TLS on a self-signed certificate."""

    formulas = {"work.py": FORMULAS}

    def setUp(self) -> None:
        super().setUp()
        key, self.cert = write_self_signed(self.folder)
        endpoint = f"ssl:0:privateKey={key}:certKey={self.cert}:interface=127.0.0.1"
        self.server = self.start("--port", endpoint)
        self.port = self.tls_port()
        self.context = ssl.create_default_context(cafile=self.cert)

    def tls_port(self) -> int:
        """The TLS port, from the server's log."""
        found = self.wait_for(
            lambda: TLS_LISTENING.search(self.server.log()),
            lambda: f"the server to log its TLS port:\n{self.server.log()}",
        )
        return int(found[1])

    def test_statusAndJobOverTLS(self) -> None:
        """Status and a Dask job over TLS answer as over TCP, with the numbers pandas computes."""
        with TLSConnection(self.port, self.context) as connection:
            assert isinstance(connection.socket, ssl.SSLSocket)
            self.assertEqual(connection.socket.version(), "TLSv1.3")
            status = connection.ask({"Header": "Info", "Request": "Status", "Id": "tls"})
            self.assertEqual((status["Status"], status["Id"]), ("OK", "tls"), status)
            self.assertEqual(status["Response"]["Pid"], self.server.process.pid)
            request = {"Directory": self.folder, "Base": "time_series.parquet", "File": "work.py"}
            answer = connection.ask({"Header": "Dask", "Request": request})
        self.assertEqual(answer["Status"], "OK", answer)
        results = answer["Response"]["Results"]
        self.assertEqual(results["peak"]["Value"], self.frame.value.max())
        self.assertEqual(results["count"]["Value"], len(self.frame))
        means = pd.read_parquet(os.path.join(self.folder, results["mean_by_sensor"]["File"]))
        pd.testing.assert_series_equal(
            means["value"],
            self.frame.groupby("sensor").value.mean(),
            check_names=False,
            check_index_type=False,
        )

    def test_noAnswerWithoutTLS(self) -> None:
        """A plain client on the TLS port gets no JSON; one that does not trust the cert fails."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE) as plain:
            plain.sendall(b'{"Header":"Info","Request":"Status"}\n')
            received = b""
            with_more = True
            while with_more:
                try:
                    chunk = plain.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                received += chunk
                with_more = bool(chunk) and len(received) < 65536
        self.assertNotIn(b'"Header"', received)
        self.assertNotIn(b"Status", received)

        untrusting = ssl.create_default_context()
        with self.assertRaises(ssl.SSLCertVerificationError):
            TLSConnection(self.port, untrusting)

        with TLSConnection(self.port, self.context) as connection:
            status = connection.ask({"Header": "Info", "Request": "Status"})
        self.assertEqual(status["Status"], "OK")
