-- Currencies, per-organisation settings (versioned like assets) and FX rates.
CREATE TABLE dalp_assets.currencies (
    code     text     PRIMARY KEY CHECK (code ~ '^[A-Z]{3}$'),
    name     text     NOT NULL,
    decimals smallint NOT NULL CHECK (decimals BETWEEN 0 AND 18)
);
INSERT INTO dalp_assets.currencies (code, name, decimals) VALUES
    ('EUR', 'Euro', 2), ('USD', 'US Dollar', 2), ('GBP', 'Pound Sterling', 2), ('CHF', 'Swiss Franc', 2),
    ('JPY', 'Yen', 0), ('SGD', 'Singapore Dollar', 2), ('AED', 'UAE Dirham', 2), ('HKD', 'Hong Kong Dollar', 2);

CREATE TABLE dalp_assets.organisation_settings (
    organisation_id   uuid        PRIMARY KEY,
    base_currency     text        NOT NULL DEFAULT 'EUR' REFERENCES dalp_assets.currencies (code),
    target_currencies text[]      NOT NULL DEFAULT '{}',
    system_address    text        CHECK (system_address ~ '^0x[0-9a-f]{40}$'),
    features          jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(features) = 'object'),
    version           integer     NOT NULL DEFAULT 1 CHECK (version > 0),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    updated_by        text        NOT NULL
);

CREATE TABLE dalp_assets.settings_versions (
    organisation_id uuid        NOT NULL,
    version         integer     NOT NULL CHECK (version > 0),
    changed_by      text        NOT NULL,
    changed_at      timestamptz NOT NULL DEFAULT now(),
    before          jsonb,
    after           jsonb       NOT NULL,
    PRIMARY KEY (organisation_id, version)
);

CREATE TABLE dalp_assets.fx_rates (
    base         text          NOT NULL REFERENCES dalp_assets.currencies (code),
    quote        text          NOT NULL REFERENCES dalp_assets.currencies (code),
    provider     text          NOT NULL CHECK (provider ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    effective_at timestamptz   NOT NULL,
    rate         numeric(38,18) NOT NULL CHECK (rate > 0),
    recorded_at  timestamptz   NOT NULL DEFAULT now(),
    recorded_by  text          NOT NULL,
    PRIMARY KEY (base, quote, provider, effective_at),
    CHECK (base <> quote)
);
CREATE INDEX fx_rates_quote_idx ON dalp_assets.fx_rates (quote);
CREATE INDEX fx_rates_latest_idx ON dalp_assets.fx_rates (base, quote, effective_at DESC);

-- The newest rate per pair (any provider; the later recording wins a tie).
CREATE VIEW dalp_assets.fx_latest AS
SELECT DISTINCT ON (base, quote) base, quote, provider, effective_at, rate
  FROM dalp_assets.fx_rates
 ORDER BY base, quote, effective_at DESC, recorded_at DESC;

GRANT SELECT, INSERT, UPDATE, DELETE ON dalp_assets.currencies, dalp_assets.organisation_settings,
    dalp_assets.fx_rates TO dalp_assets_svc;
GRANT SELECT, INSERT ON dalp_assets.settings_versions TO dalp_assets_svc;
GRANT SELECT ON dalp_assets.fx_latest TO dalp_assets_svc;
GRANT SELECT ON dalp_assets.currencies, dalp_assets.organisation_settings, dalp_assets.settings_versions,
    dalp_assets.fx_rates, dalp_assets.fx_latest TO dalp_readonly;
