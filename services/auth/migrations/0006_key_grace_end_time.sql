-- The end of a rotated key's grace period, kept apart from the expiry the
-- key was created with. A key stops working at the earlier of the two, and
-- a replacement made by rotating the key again copies `expire_time`, so it
-- does not stop when the old key's grace period ends.
-- NOTE: keys rotated before this migration had `expire_time` set to their
-- grace deadline, and their original expiry is not stored anywhere: a
-- replacement of such a key stops at that deadline.
ALTER TABLE auth.api_keys ADD COLUMN grace_end_time timestamptz;
