"""Create a development CA and one certificate per component.

Usage: python -m services.common.certs OUTPUT_DIR

Existing files are kept, so running it again changes nothing. In Kubernetes
the same files come from Secrets instead.
"""

import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Each component gets one certificate for both serving and calling others;
# its common name is the peer name services check.
COMPONENTS = ("edge", "envoy", "auth", "cds", "audit", "billing")
# The edge certificate is the public one clients see; "envoy" is Envoy's
# client certificate towards the services, with the peer name "edge".
PEER_NAMES = {"envoy": "edge"}
VALIDITY = datetime.timedelta(days=365)


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
) -> None:
    key = _key()
    common_name = PEER_NAMES.get(component, component)
    names = [
        x509.DNSName(component),
        x509.DNSName(f"{component}.arxio.svc"),
        x509.DNSName(f"{component}.arxio.svc.cluster.local"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
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

    return output


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(f"certificates in {ensure_certificates(Path(sys.argv[1]))}")
