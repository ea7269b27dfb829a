"""API key format: prefix, randomness and checksum."""

import hashlib

from services.auth import keys


class TestKeyFormat:
    def test_generated_key_is_well_formed(self):
        """A new key has the prefix, the length and a valid checksum."""
        key = keys.generate_key()

        assert key.startswith("arx_")
        assert keys.KEY_LENGTH == len(key)
        assert keys.is_well_formed(key)

    def test_keys_are_distinct(self):
        """A thousand keys are all different."""
        generated = {keys.generate_key() for _ in range(1000)}

        assert 1000 == len(generated)

    def test_any_changed_character_is_rejected(self):
        """Changing any one character breaks the checksum or the format."""
        key = keys.generate_key()
        for position in range(len(key)):
            replacement = "a" if key[position] != "a" else "b"
            changed = key[:position] + replacement + key[position + 1 :]
            assert not keys.is_well_formed(changed), position

    def test_foreign_strings_rejected(self):
        """Wrong prefix, length or alphabet is rejected without a lookup."""
        key = keys.generate_key()

        assert not keys.is_well_formed("")
        assert not keys.is_well_formed("sk_" + key[3:])
        assert not keys.is_well_formed(key + "0")
        assert not keys.is_well_formed(key[:-7] + "-" + key[-6:])

    def test_hash_is_sha256(self):
        """Only the SHA-256 digest is stored."""
        key = keys.generate_key()

        assert hashlib.sha256(key.encode()).digest() == keys.key_hash(key)

    def test_key_id_reveals_nothing_of_the_key(self):
        """The public key id is random, not derived from the secret."""
        key_id = keys.new_key_id()

        assert key_id.startswith("key_")
        assert 20 == len(key_id)
