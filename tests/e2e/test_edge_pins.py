"""Certificate pinning: published pins, and renewals that keep them."""

import json
import socket
import ssl

import pytest
from cryptography import x509

from services.common import certs
from tests.suite import cli_process


def certificate(folder) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "edge.crt").read_bytes())


class TestRenewal:
    def test_renewal_keeps_pins(self, tmp_path):
        """A new certificate for the same key keeps both pins."""
        certs.ensure_certificates(tmp_path)
        before = certs.edge_pins(tmp_path)
        old_serial = certificate(tmp_path).serial_number

        certs.renew_edge_certificate(tmp_path)

        assert before == certs.edge_pins(tmp_path)
        assert old_serial != certificate(tmp_path).serial_number

    def test_rotation_promotes_backup(self, tmp_path):
        """After a key rotation the old backup pin is the edge pin."""
        certs.ensure_certificates(tmp_path)
        before = certs.edge_pins(tmp_path)

        certs.rotate_edge_key(tmp_path)

        after = certs.edge_pins(tmp_path)
        assert before["backup"] == after["edge"]
        assert after["backup"] not in (before["edge"], before["backup"])

    def test_backup_key_private(self, tmp_path):
        certs.ensure_certificates(tmp_path)

        mode = (tmp_path / certs.BACKUP_EDGE_KEY).stat().st_mode

        assert 0o600 == mode & 0o777

    def test_pin_matches_openssl_form(self, tmp_path):
        """The pin is base64 of SHA-256 over the DER public key info."""
        certs.ensure_certificates(tmp_path)

        pin = certs.edge_pins(tmp_path)["edge"]

        assert pin.startswith("sha256/")
        assert 44 == len(pin.removeprefix("sha256/"))


@pytest.mark.e2e
class TestPublishedPins:
    def test_cli_pin_is_live_edge_key(self, stack):
        """`arxio edge pins` names the key the running edge presents."""
        completed = cli_process(
            stack, "edge", "pins", "--certs-dir", str(stack.certs_dir)
        )
        assert 0 == completed.returncode, completed.stderr
        published = json.loads(completed.stdout)
        context = ssl.create_default_context(
            cafile=str(stack.certs_dir / "ca.crt")
        )
        with socket.create_connection(("127.0.0.1", stack.edge_port)) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                presented = x509.load_der_x509_certificate(
                    tls.getpeercert(binary_form=True)
                )

        live_pin = certs.spki_pin(presented.public_key())
        assert published["edge"]["pin"] == live_pin
        assert published["backup"]["pin"] != published["edge"]["pin"]

    def test_cli_without_certificates_fails(self, stack, tmp_path):
        completed = cli_process(
            stack, "edge", "pins", "--certs-dir", str(tmp_path)
        )

        assert 2 == completed.returncode
        assert "make certs" in completed.stderr
