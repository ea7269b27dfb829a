"""Serve mutual TLS from certificate files that are replaced while running.

cert-manager renews a certificate into its Secret, and the kubelet then
swaps the mounted files (an atomic rename of the `..data` symlink). gRPC
calls `CertificateReloader.fetch` at the start of every TLS handshake, and
it reads the files again once CHECK_INTERVAL has passed. So new
connections get the renewed certificate and CA, and open connections keep
theirs.
"""

import hashlib
import threading
import time
from dataclasses import dataclass

import grpc
import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from services.common.config import ConfigError, TlsConfig

log = structlog.get_logger()

# Seconds between two reads of the files. A handshake within this time of
# the last read serves what that read found.
CHECK_INTERVAL = 1.0


class CertificateInvalid(ValueError):
    """The files do not contain a usable certificate, key and CA."""


@dataclass(frozen=True)
class CertificateFiles:
    """The PEM contents of a server's certificate chain, key and CA."""

    chain: bytes
    key: bytes
    ca: bytes

    @classmethod
    def read(cls, tls: TlsConfig) -> "CertificateFiles":
        return cls(
            chain=tls.cert_file.read_bytes(),
            key=tls.key_file.read_bytes(),
            ca=tls.ca_file.read_bytes(),
        )

    def leaf(self) -> x509.Certificate:
        """Return the first certificate of the chain, after checking all.

        Raises CertificateInvalid when a file does not parse or the key is
        not the certificate's, which happens when the files are read while
        a tool other than the kubelet rewrites them one by one.
        """
        try:
            chain = x509.load_pem_x509_certificates(self.chain)
            x509.load_pem_x509_certificates(self.ca)
            key = serialization.load_pem_private_key(self.key, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:
            # TypeError: the key is encrypted; UnsupportedAlgorithm: its
            # type is one that this cryptography build cannot load.
            raise CertificateInvalid(
                f"a file does not parse: {error}"
            ) from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        leaf = chain[0]
        if leaf.public_key().public_bytes(
            der, spki
        ) != key.public_key().public_bytes(der, spki):
            raise CertificateInvalid(
                "the private key does not belong to the certificate"
            )

        return leaf

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.chain)], root_certificates=self.ca
        )

    def digest(self) -> str:
        return hashlib.sha256(self.chain + self.key + self.ca).hexdigest()


def _described(leaf: x509.Certificate) -> dict[str, str]:
    names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)

    return {
        "common_name": str(names[0].value) if names else "",
        "serial": format(leaf.serial_number, "x"),
        "not_after": leaf.not_valid_after_utc.isoformat(),
    }


class CertificateReloader:
    """The certificate configuration fetcher of gRPC's dynamic credentials.

    A change that does not check out (a file missing or unparsable, or a
    key that is not the certificate's) is logged once and the server keeps
    serving the last good files until the next change.
    """

    def __init__(
        self,
        tls: TlsConfig,
        check_interval: float = CHECK_INTERVAL,
        clock=time.monotonic,
    ) -> None:
        self._tls = tls
        self._check_interval = check_interval
        self._clock = clock
        # gRPC calls fetch from its own threads, several at once.
        self._lock = threading.Lock()
        self._last_check = clock()
        try:
            self._current = CertificateFiles.read(tls)
            leaf = self._current.leaf()
        except (OSError, CertificateInvalid) as error:
            raise ConfigError(
                f"the TLS files {tls.cert_file}, {tls.key_file} and "
                f"{tls.ca_file} are unusable: {error}; point ARXIO_TLS_CERT, "
                "ARXIO_TLS_KEY and ARXIO_TLS_CA at a matching certificate, "
                "key and CA"
            ) from None
        self._rejected_digest: str | None = None
        log.info("tls.certificate_loaded", **_described(leaf))

    def initial_configuration(self) -> grpc.ServerCertificateConfiguration:
        return self._current.configuration()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Return a new configuration when the files changed, else None."""
        with self._lock:
            now = self._clock()
            if now - self._last_check < self._check_interval:
                return None
            self._last_check = now
            try:
                found = CertificateFiles.read(self._tls)
            except OSError as error:
                self._reject(None, f"{error.filename}: {error.strerror}")
                return None
            if found == self._current:
                return None
            try:
                leaf = found.leaf()
            except CertificateInvalid as error:
                self._reject(found.digest(), str(error))
                return None
            self._current = found
            self._rejected_digest = None
            log.info("tls.certificate_reloaded", **_described(leaf))

            return found.configuration()

    def _reject(self, digest: str | None, reason: str) -> None:
        """Log a rejected change once per distinct content."""
        key = digest or reason
        if key == self._rejected_digest:
            return
        self._rejected_digest = key
        log.warning(
            "tls.certificate_reload_rejected",
            cert_file=str(self._tls.cert_file),
            reason=reason,
            hint="serving the last good certificate until the files change",
        )


def reloading_server_credentials(
    tls: TlsConfig, check_interval: float = CHECK_INTERVAL
) -> grpc.ServerCredentials:
    """Build mutual-TLS server credentials that follow the files of `tls`."""
    reloader = CertificateReloader(tls, check_interval)

    return grpc.dynamic_ssl_server_credentials(
        reloader.initial_configuration(),
        reloader.fetch,
        require_client_authentication=True,
    )
