"""Create a development CA and one certificate per component.

Usage: python -m services.common.certs OUTPUT_DIR

Existing files are kept, so running it again changes nothing. In Kubernetes
the same files come from Secrets instead.
"""

import base64
import datetime
import hashlib
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Each component gets one certificate for both serving and calling others;
# its common name is the peer name services check.
COMPONENTS = ("edge", "envoy", "auth", "cds", "audit", "billing", "ollama")
# The edge certificate is the public one clients see; "envoy" is Envoy's
# client certificate towards the services, with the peer name "edge".
PEER_NAMES = {"envoy": "edge"}
# Further DNS names: each pod of the Ollama StatefulSet in Kubernetes has
# its own name under the headless Service `ollama-pods`, which the job that
# pulls the model calls one by one. OpenSSL matches a wildcard only when
# two or more labels follow it, so there is no `*.ollama-pods`.
EXTRA_DNS_NAMES = {
    "ollama": (
        "*.ollama-pods.arxio.svc",
        "*.ollama-pods.arxio.svc.cluster.local",
    )
}
VALIDITY = datetime.timedelta(days=365)
# A second edge key, unused until the edge key must be replaced. Clients
# that pin the edge key should pin this one too, so that a key rotation
# does not break them.
BACKUP_EDGE_KEY = "edge-backup.key"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _create_ca(
    output: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "arxio development CA")]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY * 2)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(output / "ca.key", key)
    _write_cert(output / "ca.crt", cert)

    return cert, key


def _load_ca(
    output: Path,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((output / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key(
        (output / "ca.key").read_bytes(), password=None
    )

    return cert, key


def _issue(
    output: Path,
    component: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> None:
    """Issue a component's certificate, for `key` or for a new key."""
    key = key or _key()
    common_name = PEER_NAMES.get(component, component)
    names = [
        x509.DNSName(component),
        x509.DNSName(f"{component}.arxio.svc"),
        x509.DNSName(f"{component}.arxio.svc.cluster.local"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    names += [
        x509.DNSName(name) for name in EXTRA_DNS_NAMES.get(component, ())
    ]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(output / f"{component}.key", key)
    _write_cert(output / f"{component}.crt", cert)


def ensure_certificates(output: Path) -> Path:
    """Create whatever certificate files `output` lacks; return `output`."""
    output.mkdir(parents=True, exist_ok=True)
    output.chmod(0o700)
    if (output / "ca.crt").exists() and (output / "ca.key").exists():
        ca_cert, ca_key = _load_ca(output)
    else:
        ca_cert, ca_key = _create_ca(output)
    for component in COMPONENTS:
        if not (output / f"{component}.crt").exists():
            _issue(output, component, ca_cert, ca_key)
    if not (output / BACKUP_EDGE_KEY).exists():
        _write_key(output / BACKUP_EDGE_KEY, _key())

    return output


def spki_pin(public_key) -> str:
    """Return the SHA-256 pin of a public key, as `sha256/<base64>`.

    The digest covers the DER SubjectPublicKeyInfo, so it stays the same
    across certificates for the same key. It equals `openssl x509 -pubkey
    -noout | openssl pkey -pubin -outform der | openssl dgst -sha256
    -binary | base64`.
    """
    info = public_key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )

    return "sha256/" + base64.b64encode(hashlib.sha256(info).digest()).decode()


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    return serialization.load_pem_private_key(path.read_bytes(), None)


def edge_pins(output: Path) -> dict[str, str]:
    """Return the pins of the edge certificate's key and of the backup key."""
    cert = x509.load_pem_x509_certificate((output / "edge.crt").read_bytes())

    return {
        "edge": spki_pin(cert.public_key()),
        "backup": spki_pin(_load_key(output / BACKUP_EDGE_KEY).public_key()),
    }


def renew_edge_certificate(output: Path) -> None:
    """Issue a new edge certificate for the edge's existing key.

    The pin, which covers the key and not the certificate, stays valid.
    Envoy reads the file at start, so restart it afterwards.
    """
    ca_cert, ca_key = _load_ca(output)
    _issue(output, "edge", ca_cert, ca_key, _load_key(output / "edge.key"))


def rotate_edge_key(output: Path) -> None:
    """Move the edge to its backup key and create a new backup key.

    Clients that pinned both keys keep working. They must add the new
    backup key's pin before the next rotation.
    """
    ca_cert, ca_key = _load_ca(output)
    backup = _load_key(output / BACKUP_EDGE_KEY)
    _issue(output, "edge", ca_cert, ca_key, backup)
    _write_key(output / BACKUP_EDGE_KEY, _key())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(f"certificates in {ensure_certificates(Path(sys.argv[1]))}")
