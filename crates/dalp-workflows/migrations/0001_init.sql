-- Workflow engine state: durable runs. Later migrations add the step journal, leased work
-- queue, timers and the transaction request lifecycle.
CREATE SCHEMA dalp_workflows;

CREATE TABLE dalp_workflows.runs (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    organisation_id uuid        NOT NULL,
    kind            text        NOT NULL,
    idempotency_key text        NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending','running','sleeping','waiting','completed','failed','cancelled','dead_letter')),
    input           jsonb       NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organisation_id, kind, idempotency_key)
) WITH (fillfactor = 80);

GRANT USAGE ON SCHEMA dalp_workflows TO dalp_workflows_svc, dalp_readonly;
GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_workflows.runs TO dalp_workflows_svc;
GRANT SELECT ON dalp_workflows.runs TO dalp_readonly;
