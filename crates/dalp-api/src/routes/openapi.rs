//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 description of this API, generated from the
//! handlers themselves. Every route is registered through `utoipa_axum::routes!` from its
//! `#[utoipa::path]` annotation, so the router and the document are built from one list; the
//! request and response bodies are the Rust types the handlers use (`ToSchema`).
//!
//! What every operation of a kind can answer is added here once, from what the layers in front
//! of the handlers do, instead of on each annotation:
//! - any request: 400 (a target with `%00` or bytes that are not UTF-8) and 503 (the request
//!   deadline, or the database unreachable);
//! - an authenticated operation: 401, 403 (role missing, a read-only API key writing, a
//!   pending second factor) and 429 (the key's rate limit);
//! - an operation with a body: 400 (malformed JSON), 413, 415 and 422;
//! - a path with parameters: 404 (nothing by that id);
//! - under `/api/v1/`: the `x-request-id` response header.

use std::sync::OnceLock;

use axum::response::IntoResponse;
use serde_json::{json, Value};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dalp",
        description = "Data layer of the Digital Asset Lifecycle Platform. Errors always have the \
                       shape {\"error\":{\"code\",\"message\",\"field\"?}}. Versioned records \
                       answer with an ETag; changes send it back as If-Match."
    ),
    components(schemas(crate::error::Body)),
    security(("session" = []), ("apiKey" = [])),
    modifiers(&Security)
)]
struct Base;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "session",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Session token from POST /api/v1/auth/login (prefix dalps_)",
                    ))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Key",
                "API key (prefix dalp_); scope read allows GET only",
            ))),
        );
    }
}

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
async fn openapi_json() -> axum::response::Response {
    axum::Json(document()).into_response()
}

/// The document, built once from the route table.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let (_, api) = super::openapi_router().split_for_parts();
        let mut doc = serde_json::to_value(api).expect("the OpenAPI document serialises");
        add_common_responses(&mut doc);
        mark_text_fields(&mut doc);
        doc
    })
}

pub(crate) fn base() -> utoipa::openapi::OpenApi {
    let mut api = Base::openapi();
    api.info.version = env!("CARGO_PKG_VERSION").into();
    api
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

/// Fields marked `x-dalp-text` take names and labels as the validators do: they get
/// [`dalp_types::TEXT_PATTERN`] (one constant for the document and the code).
fn mark_text_fields(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.remove("x-dalp-text").is_some() {
                o.insert("pattern".into(), json!(dalp_types::TEXT_PATTERN));
            }
            o.values_mut().for_each(mark_text_fields);
        }
        Value::Array(a) => a.iter_mut().for_each(mark_text_fields),
        _ => {}
    }
}

/// Adds the answers the layers in front of every handler can give (see the module comment).
fn add_common_responses(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            // Handler names repeat across modules (`list`, `create`): the tag (one per
            // module) makes the id unique.
            if let (Some(tag), Some(id)) = (op["tags"][0].as_str(), op["operationId"].as_str()) {
                op["operationId"] = json!(format!("{tag}_{id}"));
            }
            let public = op["security"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|r| r.as_object().is_some_and(|o| o.is_empty()))
            });
            let has_body = op.get("requestBody").is_some();
            let mut add: Vec<(&str, &str)> = vec![
                ("400", "Bad request: the target holds %00 or is not UTF-8, a parameter is malformed, or the body is not JSON"),
                ("431", "More than 100 header fields or 64 KiB of headers"),
                ("503", "Not available now: the request deadline passed or the database is unreachable; retry"),
            ];
            if !public {
                add.push((
                    "401",
                    "No valid session or API key, or the login must be repeated",
                ));
                add.push(("403", "Authenticated, but not allowed: a role is missing, a read-only key tried to write, or the second factor is pending"));
                add.push(("429", "Rate limited; see Retry-After when present"));
            }
            if has_body {
                add.push(("413", "Body larger than the server accepts"));
                add.push(("415", "Send Content-Type: application/json"));
                add.push((
                    "422",
                    "The body is JSON of the wrong shape or an invalid value; `field` names it",
                ));
            }
            if op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"))
            {
                add.push(("422", "A query parameter names something the server does not know (a status, a currency); `field` names it"));
            }
            if path.contains('{') {
                add.push(("404", "Nothing by that id"));
            }
            let responses = op["responses"]
                .as_object_mut()
                .expect("every operation has responses");
            for (code, description) in add {
                responses
                    .entry(code)
                    .or_insert_with(|| error_response(description));
            }
            // Reads that may come from a replica take a consistency token and say where they
            // were served; changes hand the token out (crate::consistency).
            let replica_read = method == "get"
                && (path.starts_with("/api/v1/indexed/{chain}/")
                    || [
                        "/api/v1/assets",
                        "/api/v1/assets/{id}",
                        "/api/v1/assets/{id}/history",
                    ]
                    .contains(&path.as_str()));
            if replica_read {
                // Described, not declared as a parameter: HTTP trims a header value, so a
                // blank token cannot be told from none, which a declared pattern would ask.
                let text = op["description"].as_str().unwrap_or_default().to_string();
                op["description"] = json!(format!(
                    "{text}\n\nWith replicas configured this read may be served by a replica (see `x-dalp-read-from`). Send a change's `x-dalp-consistency` value back in the `x-dalp-consistency` request header to read at least that change (read-your-writes); a malformed one is 400."
                ).trim_start().to_string());
                let responses = op["responses"].as_object_mut().expect("responses");
                if let Some(ok) = responses.get_mut("200") {
                    ok["headers"][crate::consistency::READ_FROM_HEADER] = json!({
                        "description": "With replicas configured: `replica HOST:PORT` or `primary`",
                        "schema": { "type": "string" }
                    });
                }
            }
            let responses = op["responses"]
                .as_object_mut()
                .expect("every operation has responses");
            if method != "get" && path.starts_with("/api/v1/") {
                for (_, r) in responses.iter_mut().filter(|(c, _)| c.starts_with('2')) {
                    r["headers"][crate::consistency::CONSISTENCY_HEADER] = json!({
                        "description": "With replicas configured: the primary's WAL position and timeline after this change (X/Y@T); send it with a later read to see the change",
                        "schema": { "type": "string" }
                    });
                }
            }
            // Every indexed read says what it reflects (routes/indexed.rs).
            if path.starts_with("/api/v1/indexed/{chain}/") && method == "get" {
                if let Some(ok) = responses.get_mut("200") {
                    ok["headers"][super::indexed::INDEXED_BLOCK_HEADER] = json!({
                        "description": "The checkpoint when the read began (`none` before the first block)",
                        "schema": { "type": "string" }
                    });
                    ok["headers"][super::indexed::CHAIN_STATE_HEADER] = json!({
                        "description": "`following`, or `diverged`: the node no longer has the indexed chain and ingest is stopped",
                        "schema": { "type": "string", "enum": ["following", "diverged"] }
                    });
                }
            }
            if path.starts_with("/api/v1/") && path != "/api/v1/openapi.json" {
                for r in responses.values_mut() {
                    r["headers"]["x-request-id"] = json!({
                        "description": "The request's id (the client's, when it sent one of up to 100 characters); every audit record of the request carries it",
                        "schema": { "type": "string" }
                    });
                }
            }
        }
    }
}
