//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 description of this API. A test checks that
//! every route the router serves is described here.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::AppState;

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/openapi.json", get(|| async { Json(document()) }))
}

fn op(summary: &str, auth: bool, body: Option<&str>, ok: &str, errors: &[u16]) -> Value {
    let mut responses = serde_json::Map::new();
    responses.insert(
        ok.split(':').next().unwrap_or("200").into(),
        json!({ "description": ok.split(':').nth(1).unwrap_or("OK") }),
    );
    for code in errors {
        responses.insert(
            code.to_string(),
            json!({ "$ref": "#/components/responses/Error" }),
        );
    }
    let mut o = json!({ "summary": summary, "responses": responses });
    if auth {
        o["security"] = json!([{ "session": [] }, { "apiKey": [] }]);
    } else {
        o["security"] = json!([]);
    }
    if let Some(schema) = body {
        o["requestBody"] = json!({
            "required": true,
            "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
        });
    }
    o
}

/// The document. Paths use `{id}` placeholders as the router does.
pub fn document() -> Value {
    let e_auth: &[u16] = &[401, 403, 429];
    json!({
        "openapi": "3.1.0",
        "info": { "title": "dalp", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Data layer of the Digital Asset Lifecycle Platform. Errors always have the shape {\"error\":{\"code\",\"message\"}}." },
        "paths": {
            "/healthz": { "get": op("Process is up", false, None, "200:up", &[]) },
            "/readyz": { "get": op("Database reachable and migrations current", false, None, "200:ready", &[503]) },
            "/api/v1/auth/login": { "post": op("Log in with email and password; may require a second factor", false, Some("Login"), "200:session token", &[400, 401, 403, 413, 415, 422, 429]) },
            "/api/v1/auth/mfa/verify": { "post": op("Complete a pending login with a TOTP or backup code", true, Some("Code"), "200:authenticated", &[401, 409, 422]) },
            "/api/v1/auth/logout": { "post": op("Revoke the current session", true, None, "204:logged out", &[401]) },
            "/api/v1/auth/sessions": { "get": op("List the caller's sessions", true, None, "200:sessions", e_auth) },
            "/api/v1/auth/sessions/{id}": { "delete": op("Revoke one of the caller's sessions", true, None, "204:revoked", &[401, 403, 404]) },
            "/api/v1/mfa/totp": { "post": op("Start TOTP enrolment", true, None, "200:secret and otpauth URI", &[401, 409]) },
            "/api/v1/mfa/totp/confirm": { "post": op("Confirm TOTP enrolment; returns one-time backup codes", true, Some("Code"), "200:backup codes", &[401, 404, 409]) },
            "/api/v1/api-keys": {
                "post": op("Create an API key (shown once; needs a login within 5 minutes)", true, Some("NewApiKey"), "201:key", &[401, 403, 422]),
                "get": op("List the caller's API keys", true, None, "200:keys", e_auth)
            },
            "/api/v1/api-keys/{id}": { "delete": op("Revoke an API key", true, None, "204:revoked", &[401, 403, 404]) },
            "/api/v1/me": { "get": op("The caller's own profile", true, None, "200:user", e_auth) },
            "/api/v1/users": {
                "post": op("Create a user (admin)", true, Some("NewUser"), "201:user", &[401, 403, 409, 413, 422]),
                "get": op("List users (admin); ?limit=&offset=", true, None, "200:users", &[400, 401, 403])
            },
            "/api/v1/users/{id}": {
                "get": op("Read a user (admin)", true, None, "200:user", &[401, 403, 404]),
                "patch": op("Change name, wallet address, ban state (admin)", true, Some("UserPatch"), "200:user", &[401, 403, 404, 409, 422]),
                "delete": op("Delete a user (admin, login within 5 minutes)", true, None, "204:deleted", &[401, 403, 404])
            },
            "/api/v1/users/{id}/roles": { "post": op("Grant a platform role (admin, login within 5 minutes)", true, Some("RoleGrant"), "200:user", &[401, 403, 404, 422]) },
            "/api/v1/users/{id}/roles/{role}": { "delete": op("Revoke a platform role (admin, login within 5 minutes)", true, None, "200:user", &[401, 403, 404]) },
            "/api/v1/users/{id}/kyc": {
                "get": op("Read a KYC profile (identityManager; audited)", true, None, "200:profile", &[401, 403, 404]),
                "put": op("Write a KYC profile (identityManager)", true, Some("KycProfile"), "204:stored", &[401, 403, 404, 422])
            },
            "/api/v1/assets": {
                "post": op("Create an asset (tokenManager); the ETag is its version", true, Some("AssetInput"), "201:asset", &[401, 403, 409, 422]),
                "get": op("List assets (tokenManager, auditor); ?organisation_id=&limit=&offset=", true, None, "200:assets", &[400, 401, 403])
            },
            "/api/v1/assets/{id}": {
                "get": op("Read an asset; ETag is its version", true, None, "200:asset", &[401, 403, 404]),
                "put": op("Replace an asset (tokenManager); needs If-Match with the version read", true, Some("AssetInput"), "200:asset", &[401, 403, 404, 409, 422, 428]),
                "delete": op("Delete an asset (tokenManager); needs If-Match", true, None, "204:deleted", &[401, 403, 404, 409, 428])
            },
            "/api/v1/assets/{id}/publish": { "post": op("Publish a draft asset (tokenManager); If-Match", true, None, "200:asset", &[401, 403, 404, 409, 428]) },
            "/api/v1/assets/{id}/compliance": {
                "get": op("The asset's compliance modules; ETag is the configuration version", true, None, "200:configuration", &[401, 403, 404]),
                "put": op("Set the modules (complianceManager); If-Match (\"0\" first). Draft: applied (200). Published: pending a second person's approval (202)", true, Some("Modules"), "200:applied", &[401, 403, 404, 409, 422, 428])
            },
            "/api/v1/compliance-changes/{id}/approve": { "post": op("Approve a pending compliance change (complianceManager, not its proposer)", true, None, "200:applied", &[401, 403, 404, 409]) },
            "/api/v1/assets/{id}/history": { "get": op("Every version of an asset: who, when, before, after", true, None, "200:versions", &[401, 403, 404]) },
            "/api/v1/settings/{organisation_id}": {
                "get": op("Organisation settings (admin, auditor); defaults when never saved; ETag is the version", true, None, "200:settings", &[401, 403, 404]),
                "put": op("Save organisation settings (admin); If-Match with the version read, \"0\" for the first save", true, Some("SettingsInput"), "200:settings", &[401, 403, 409, 422, 428])
            },
            "/api/v1/currencies": { "get": op("Known currencies", true, None, "200:currencies", &[401]) },
            "/api/v1/fx-rates": { "post": op("Record an FX rate (admin); rate is decimal text", true, Some("FxInput"), "201:rate", &[401, 403, 409, 422]) },
            "/api/v1/fx-rates/latest": { "get": op("Newest rate per currency pair; ?base=EUR", true, None, "200:rates", &[401, 422]) },
            "/api/v1/templates": {
                "post": op("Create an instrument template, as a draft (tokenManager)", true, Some("TemplateInput"), "201:template", &[401, 403, 409, 422]),
                "get": op("Templates an organisation may use (system and its own, minus hidden); ?organisation_id= required", true, None, "200:templates", &[400, 401, 403])
            },
            "/api/v1/templates/{id}": {
                "get": op("Read a template; ETag is its version", true, None, "200:template", &[401, 403, 404]),
                "put": op("Replace a template (tokenManager, If-Match); once published only the name may change", true, Some("TemplateInput"), "200:template", &[401, 403, 404, 409, 422, 428])
            },
            "/api/v1/templates/{id}/publish": { "post": op("Publish a draft template (If-Match)", true, None, "200:template", &[401, 403, 404, 409, 428]) },
            "/api/v1/templates/{id}/visibility": { "post": op("Hide or show a template for an organisation", true, None, "204:done", &[401, 403, 404, 422]) },
            "/api/v1/templates/{id}/history": { "get": op("Every version of a template", true, None, "200:versions", &[401, 403, 404]) },
            "/api/v1/settings/{organisation_id}/history": { "get": op("Every version of an organisation's settings", true, None, "200:versions", &[401, 403, 404]) },
            "/api/v1/assets/{id}/compliance/history": { "get": op("Every version of an asset's compliance modules, with approvers", true, None, "200:versions", &[401, 403, 404]) },
            "/api/v1/audit/events": { "get": op("Audit events (auditor): ?from=&to= (RFC 3339, default last 30 days), actor, action, resource_type, resource_id, outcome, limit (1-1000), before_id", true, None, "200:events, newest first, with next_before_id", &[400, 401, 403]) },
            "/api/v1/audit/verify": { "get": op("Recompute the audit hash chain (auditor)", true, None, "200:report with ok and the first problem", &[401, 403]) },
            "/api/v1/indexed/chains": {
                "get": op("Registered chains", true, None, "200:chains", &[401]),
                "post": op("Register a chain: chain_id, name, finality_depth (admin or systemManager)", true, None, "201:chain", &[401, 403, 409, 422])
            },
            "/api/v1/indexed/{chain}/blocks": { "post": op("Ingest consecutive blocks with transactions and logs (admin or systemManager): idempotent; a reorg within the finality depth is rolled back first", true, None, "200:outcome (applied, skipped, reorg, checkpoint)", &[401, 403, 404, 409, 413, 422]) },
            "/api/v1/indexed/{chain}/status": { "get": op("Sync status: checkpoint, finalized, head, lag", true, None, "200:status", &[401, 404]) },
            "/api/v1/indexed/{chain}/accounts/{account}/balances": { "get": op("Current token balances of an account", true, None, "200:balances", &[400, 401, 404]) },
            "/api/v1/indexed/{chain}/accounts/{account}/transfers": { "get": op("Transfers from or to an account, newest first: ?since=&until= (RFC 3339; prune partitions), limit (1-1000), before=<block>:<log>", true, None, "200:transfers with next", &[400, 401, 404]) },
            "/api/v1/indexed/{chain}/tokens/{token}/holders": { "get": op("Holders, largest first: ?limit (1-1000), after=<balance>:<account>", true, None, "200:holders with next", &[400, 401, 404]) },
            "/api/v1/indexed/{chain}/tokens/{token}/transfers": { "get": op("Transfers of a token, newest first (parameters as for accounts)", true, None, "200:transfers with next", &[400, 401, 404]) },
            "/api/v1/indexed/{chain}/tokens/{token}/balances/{account}": { "get": op("Balance after block ?block=N (default: the checkpoint)", true, None, "200:balance", &[400, 401, 404]) },
            "/api/v1/indexed/{chain}/tokens/{token}/supply": { "get": op("Total supply after block ?block=N (default: the checkpoint)", true, None, "200:total_supply", &[400, 401, 404]) },
            "/api/v1/workflows/runs": {
                "get": op("Runs, newest change first: ?status= (pending, running, sleeping, waiting, completed, failed, cancelled, dead_letter, stalled), limit (admin, systemManager, auditor)", true, None, "200:runs", &[401, 403, 422]),
                "post": op("Start a run (admin, systemManager): organisation_id, kind, idempotency_key, input, priority, max_attempts, concurrency_key, correlation_id; the same key returns the first run (200)", true, None, "201:run", &[401, 403, 422])
            },
            "/api/v1/workflows/runs/{id}": { "get": op("One run", true, None, "200:run", &[401, 403, 404]) },
            "/api/v1/workflows/runs/{id}/retry": { "post": op("Make a dead-lettered or failed run ready again (admin, systemManager)", true, None, "200:run", &[401, 403, 404, 409]) },
            "/api/v1/workflows/runs/{id}/cancel": { "post": op("Cancel a run that has not ended (admin, systemManager)", true, None, "200:run", &[401, 403, 404, 409]) },
            "/api/v1/workflows/runs/{id}/signal": { "post": op("Deliver a signal {name, payload} to a run (admin, systemManager)", true, None, "200:run", &[401, 403, 404, 409, 422]) },
            "/api/v1/workflows/stats": { "get": op("Queue depth, stalled runs, claim latency", true, None, "200:stats", &[401, 403]) },
            "/api/v1/workflows/tx-requests": {
                "get": op("Transaction requests in ?status= (default DEAD_LETTER)", true, None, "200:tx_requests", &[401, 403, 422]),
                "post": op("Create a transaction request (admin, systemManager, tokenManager); deduplicated by (sender, chain, idempotency key) for 24 hours", true, None, "201:tx_request", &[401, 403, 422])
            },
            "/api/v1/workflows/tx-requests/{id}": { "get": op("A transaction request and its transitions", true, None, "200:tx_request", &[401, 403, 404]) },
            "/api/v1/workflows/tx-requests/{id}/transition": { "post": op("Move a request to {to} if legal (admin, systemManager); PREPARING allocates the nonce", true, None, "200:tx_request", &[401, 403, 404, 409, 422]) },
            "/metrics": { "get": op("Prometheus metrics: audit seal lag, identity cache", false, None, "200:text exposition format", &[]) },
            "/api/v1/openapi.json": { "get": op("This document", false, None, "200:OpenAPI document", &[]) }
        },
        "components": {
            "securitySchemes": {
                "session": { "type": "http", "scheme": "bearer", "description": "Session token from /api/v1/auth/login (prefix dalps_)" },
                "apiKey": { "type": "apiKey", "in": "header", "name": "X-Api-Key", "description": "API key (prefix dalp_); scope read allows GET only" }
            },
            "responses": {
                "Error": { "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } }
            },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"],
                    "properties": { "code": { "type": "string" }, "message": { "type": "string" } } } } },
                "Login": { "type": "object", "additionalProperties": false, "required": ["email", "password"],
                    "properties": { "email": { "type": "string", "maxLength": 254 }, "password": { "type": "string", "maxLength": 1024 } } },
                "Code": { "type": "object", "additionalProperties": false, "required": ["code"], "properties": { "code": { "type": "string" } } },
                "NewApiKey": { "type": "object", "additionalProperties": false, "required": ["name", "scope"],
                    "properties": { "name": { "type": "string", "maxLength": 100 }, "scope": { "enum": ["read", "read-write"] },
                                    "expires_in_days": { "type": "integer", "minimum": 1, "maximum": 3650 },
                                    "rate_limit_per_minute": { "type": "integer", "minimum": 1, "maximum": 100000 } } },
                "NewUser": { "type": "object", "additionalProperties": false, "required": ["email", "name"],
                    "properties": { "email": { "type": "string" }, "name": { "type": "string", "maxLength": 200 },
                                    "password": { "type": "string", "minLength": 12, "maxLength": 256 },
                                    "wallet_address": { "type": "string", "pattern": "^0x[0-9a-fA-F]{40}$" },
                                    "roles": { "type": "array", "items": { "$ref": "#/components/schemas/PlatformRole" } } } },
                "UserPatch": { "type": "object", "additionalProperties": false,
                    "properties": { "name": { "type": "string" }, "wallet_address": { "type": ["string", "null"] },
                                    "ban": { "type": "object", "required": ["reason"], "properties": { "reason": { "type": "string", "maxLength": 500 }, "until": { "type": "string", "format": "date-time" } } },
                                    "unban": { "type": "boolean" } } },
                "RoleGrant": { "type": "object", "additionalProperties": false, "required": ["role"], "properties": { "role": { "$ref": "#/components/schemas/PlatformRole" } } },
                "PlatformRole": { "enum": ["admin", "auditor", "systemManager", "tokenManager", "complianceManager", "claimPolicyManager", "claimIssuer", "identityManager"] },
                "AssetInput": { "type": "object", "additionalProperties": false,
                    "required": ["organisation_id", "name", "symbol", "decimals", "base_type"],
                    "properties": { "organisation_id": { "type": "string", "format": "uuid" }, "name": { "type": "string", "maxLength": 50 },
                                    "symbol": { "type": "string", "pattern": "^[A-Z0-9][A-Z0-9.-]{0,11}$" }, "decimals": { "type": "integer", "minimum": 0, "maximum": 18 },
                                    "base_type": { "enum": ["bond", "equity", "fund", "stablecoin", "deposit", "real_estate", "precious_metal"] },
                                    "isin": { "type": "string", "description": "ISO 6166, check digit verified" },
                                    "country_numeric": { "type": "integer", "minimum": 1, "maximum": 999 },
                                    "chain_id": { "type": "integer", "minimum": 1 }, "contract_address": { "type": "string", "description": "EIP-55 accepted, stored lower-case" } } },
                "SettingsInput": { "type": "object", "additionalProperties": false, "required": ["base_currency"],
                    "properties": { "base_currency": { "type": "string", "pattern": "^[A-Z]{3}$" },
                                    "target_currencies": { "type": "array", "items": { "type": "string" }, "maxItems": 32 },
                                    "system_address": { "type": "string" },
                                    "features": { "type": "object", "additionalProperties": { "type": "boolean" } } } },
                "FxInput": { "type": "object", "additionalProperties": false, "required": ["base", "quote", "provider", "effective_at", "rate"],
                    "properties": { "base": { "type": "string" }, "quote": { "type": "string" }, "provider": { "type": "string" },
                                    "effective_at": { "type": "string", "format": "date-time" },
                                    "rate": { "type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$", "description": "exact decimal, up to 18 places" } } },
                "Modules": { "type": "object", "additionalProperties": false, "required": ["modules"],
                    "properties": { "modules": { "type": "array", "maxItems": 12, "items": { "type": "object", "required": ["type"],
                        "properties": { "type": { "enum": ["AddressBlockList", "CountryAllowList", "CountryBlockList", "IdentityAllowList", "IdentityBlockList",
                            "SMARTIdentityVerification", "TokenSupplyLimit", "InvestorCount", "TimeLock", "TransferApproval", "CapitalRaiseLimit", "Collateral"] } } } } } },
                "TemplateInput": { "type": "object", "additionalProperties": false, "required": ["slug", "name", "base_type", "asset_class"],
                    "properties": { "organisation_id": { "type": "string", "format": "uuid", "description": "absent: a system template" },
                                    "slug": { "type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$" }, "name": { "type": "string", "maxLength": 100 },
                                    "base_type": { "enum": ["bond", "equity", "fund", "stablecoin", "deposit", "real_estate", "precious_metal"] },
                                    "asset_class": { "enum": ["fixed_income", "flexible_income", "cash_equivalent", "real_asset"] },
                                    "features": { "type": "array", "items": { "enum": ["historical-balances", "maturity-redemption", "fixed-treasury-yield", "voting-power", "aum-fee", "transaction-fee", "conversion", "permit"] } },
                                    "metadata_schema": { "type": "array", "items": { "type": "object", "required": ["key", "label", "type"],
                                        "properties": { "key": { "type": "string" }, "label": { "type": "string" },
                                                        "type": { "enum": ["string", "integer", "decimal", "date", "boolean", "address"] },
                                                        "required": { "type": "boolean" }, "mutable": { "type": "boolean" },
                                                        "constraints": { "type": "object", "properties": { "max_length": { "type": "integer" }, "min": { "type": "string" }, "max": { "type": "string" }, "enum": { "type": "array", "items": { "type": "string" } } } } } } } } },
                "KycProfile": { "type": "object", "additionalProperties": false,
                    "required": ["first_name", "last_name", "date_of_birth", "country", "residency_status", "national_id"],
                    "properties": { "first_name": { "type": "string" }, "last_name": { "type": "string" },
                                    "date_of_birth": { "type": "string", "format": "date" }, "country": { "type": "string", "pattern": "^[A-Z]{2}$" },
                                    "residency_status": { "enum": ["resident", "non_resident", "dual_resident", "unknown"] },
                                    "national_id": { "type": "string", "maxLength": 64 } } }
            }
        }
    })
}
