-- Key rotation is an entry of the chain itself: an event-less batch, signed by the outgoing
-- key, names the next key (its id and public key) inside its hash. From the next batch on,
-- only that key may sign; verifiers that trust the first key follow the rotations.
ALTER TABLE dalp_audit.seal_batches
    ADD COLUMN next_key_id text,
    ADD COLUMN next_public bytea,
    ADD CONSTRAINT seal_batches_next_key CHECK ((next_key_id IS NULL) = (next_public IS NULL));
