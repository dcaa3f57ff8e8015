-- Found by `dalp db lint`: the settings' base currency references currencies without an
-- index, so changing a currency scanned every organisation's settings.
CREATE INDEX organisation_settings_base_currency_idx ON dalp_assets.organisation_settings (base_currency);
