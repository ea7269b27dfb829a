"""The credential cache: expiry, and nothing cached while not listening."""

from services.auth.credential_cache import CredentialCache
from services.auth.store import Credential

CREDENTIAL = Credential(
    key_id="key_0123456789abcdef",
    org_id="00000000-0000-4000-8000-000000000001",
    scopes=frozenset({"CLINICAL_REVIEW"}),
    plan="free",
    org_state="active",
    ip_allowlist=(),
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entry_expires_after_ttl():
    clock = Clock()
    cache = CredentialCache(ttl=1.0, clock=clock)
    cache.listening = True
    cache.put(b"digest", CREDENTIAL)

    assert CREDENTIAL == cache.get(b"digest")
    clock.now += 1.0
    assert None is cache.get(b"digest")


def test_nothing_cached_while_not_listening():
    """Without notifications a revocation could go unseen: no caching."""
    cache = CredentialCache(ttl=1.0)
    cache.put(b"digest", CREDENTIAL)
    cache.listening = True

    assert None is cache.get(b"digest")


def test_clear_drops_every_entry():
    cache = CredentialCache(ttl=60.0)
    cache.listening = True
    cache.put(b"a", CREDENTIAL)
    cache.put(b"b", CREDENTIAL)

    cache.clear()

    assert None is cache.get(b"a")
    assert None is cache.get(b"b")


def test_zero_ttl_disables_cache():
    cache = CredentialCache(ttl=0)
    cache.listening = True
    cache.put(b"digest", CREDENTIAL)

    assert None is cache.get(b"digest")
