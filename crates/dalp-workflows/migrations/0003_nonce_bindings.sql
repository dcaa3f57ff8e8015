-- A nonce that reached the chain is bound to the request that broadcast it, for good: it is
-- never released to another request, whatever happens to that request later. When such a
-- request ends without being mined (FAILED, CANCELLED), its nonce is stranded: every later
-- nonce of the signer is unmineable until something fills it, so the store creates a
-- replacement request (a no-op self-transfer with the same nonce, `replaces` naming the
-- request it stands in for), which the engine drives like any other.

-- Who broadcast which nonce. Only grows (the service role may INSERT and SELECT; a trigger
-- refuses UPDATE and DELETE even to the owner).
CREATE TABLE dalp_workflows.broadcast_nonces (
    chain_id   bigint      NOT NULL CHECK (chain_id > 0),
    signer     bytea       NOT NULL CHECK (length(signer) = 20),
    nonce      bigint      NOT NULL CHECK (nonce >= 0),
    request_id uuid        NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, signer, nonce, request_id)
);
CREATE INDEX broadcast_nonces_request_idx ON dalp_workflows.broadcast_nonces (request_id);

ALTER TABLE dalp_workflows.tx_requests
    ADD COLUMN replaces uuid REFERENCES dalp_workflows.tx_requests (id);
-- One live (not FAILED or CANCELLED) holder per nonce; ended requests keep the nonce they
-- broadcast, as history.
DROP INDEX dalp_workflows.tx_requests_nonce_idx;
CREATE UNIQUE INDEX tx_requests_live_nonce_idx ON dalp_workflows.tx_requests (chain_id, sender, nonce)
    WHERE nonce IS NOT NULL AND status NOT IN ('FAILED', 'CANCELLED');
-- One replacement per stranded request.
CREATE UNIQUE INDEX tx_requests_replaces_idx ON dalp_workflows.tx_requests (replaces)
    WHERE replaces IS NOT NULL;

CREATE FUNCTION dalp_workflows.broadcast_nonces_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dalp_workflows.broadcast_nonces only grows: a broadcast nonce stays bound to its request'
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER broadcast_nonces_append_only BEFORE UPDATE OR DELETE ON dalp_workflows.broadcast_nonces
    FOR EACH ROW EXECUTE FUNCTION dalp_workflows.broadcast_nonces_append_only();

-- A second request may broadcast a nonce only as a replacement, and only once every earlier
-- broadcaster of it has ended without being mined.
CREATE FUNCTION dalp_workflows.broadcast_nonce_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM dalp_workflows.broadcast_nonces b
          JOIN dalp_workflows.tx_requests r ON r.id = b.request_id
         WHERE b.chain_id = NEW.chain_id AND b.signer = NEW.signer AND b.nonce = NEW.nonce
           AND b.request_id <> NEW.request_id
           AND (r.status NOT IN ('FAILED', 'CANCELLED')
                OR NOT EXISTS (SELECT 1 FROM dalp_workflows.tx_requests me
                                WHERE me.id = NEW.request_id AND me.replaces IS NOT NULL)))
    THEN
        RAISE EXCEPTION 'nonce % of signer \x% on chain % was broadcast by another request', NEW.nonce, encode(NEW.signer, 'hex'), NEW.chain_id
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER broadcast_nonce_check BEFORE INSERT ON dalp_workflows.broadcast_nonces
    FOR EACH ROW EXECUTE FUNCTION dalp_workflows.broadcast_nonce_check();

-- A broadcast nonce never returns to the pool.
CREATE FUNCTION dalp_workflows.released_nonce_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM dalp_workflows.broadcast_nonces b
                WHERE b.chain_id = NEW.chain_id AND b.signer = NEW.signer AND b.nonce = NEW.nonce) THEN
        RAISE EXCEPTION 'nonce % of signer \x% on chain % was broadcast: it can never be released', NEW.nonce, encode(NEW.signer, 'hex'), NEW.chain_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER released_nonce_check BEFORE INSERT ON dalp_workflows.released_nonces
    FOR EACH ROW EXECUTE FUNCTION dalp_workflows.released_nonce_check();

-- ...nor leaves the request that broadcast it.
CREATE FUNCTION dalp_workflows.bound_nonce_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.nonce IS NOT NULL AND NEW.nonce IS DISTINCT FROM OLD.nonce AND EXISTS (
        SELECT 1 FROM dalp_workflows.broadcast_nonces b
         WHERE b.request_id = OLD.id AND b.nonce = OLD.nonce) THEN
        RAISE EXCEPTION 'transaction request % broadcast nonce %: it stays bound to it', OLD.id, OLD.nonce
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER bound_nonce_check BEFORE UPDATE OF nonce ON dalp_workflows.tx_requests
    FOR EACH ROW EXECUTE FUNCTION dalp_workflows.bound_nonce_check();

GRANT SELECT, INSERT ON dalp_workflows.broadcast_nonces TO dalp_workflows_svc;
GRANT SELECT ON dalp_workflows.broadcast_nonces TO dalp_readonly;
