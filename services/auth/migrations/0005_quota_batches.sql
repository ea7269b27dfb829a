-- How many requests the latest update of a row added. The auth service
-- counts a batch of requests in one update and needs the number it was
-- granted to tell which requests of the batch fit under the limit.
ALTER TABLE auth.daily_usage
    ADD COLUMN last_grant bigint NOT NULL DEFAULT 0
        CHECK (last_grant >= 0);
