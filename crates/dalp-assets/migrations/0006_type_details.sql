-- Type-specific fields (bond face value and maturity, fund fee, base price …), validated per
-- base type by the store; amounts are exact decimal text, never floats.
ALTER TABLE dalp_assets.assets
    ADD COLUMN details jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object');
