-- Who asked and from where: the request/correlation id and the client address.
ALTER TABLE dalp_audit.events
    ADD COLUMN request_id text CHECK (length(request_id) <= 200),
    ADD COLUMN source_ip  inet;
