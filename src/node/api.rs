//! The HTTP API (axum): records, status, metrics.
//!
//! `GET/PUT/PATCH/DELETE /v1/records/{collection}/{key}`, `GET /v1/records/{collection}`
//! (`?after=KEY&limit=N`), `GET /v1/records/{collection}/{key}/history`, `GET
//! /v1/records/{collection}/{key}?at=VERSION` (the record as it was), `POST
//! /v1/records/{collection}/{key}/revert` with `{"to": VERSION}` (a new change restoring it),
//! `GET/POST /v1/records/{collection}/{key}/automerge` (the saved document out, or merged in),
//! `GET /v1/audit` (`?collection=&record=&source=&node=&since=&until=&limit=`: changes with
//! their node, source and time), `GET /v1/conflicts` (`?collection=&limit=`), `POST
//! /v1/records/{collection}/{key}/resolve` with `{"field": F, "pick": N}` or `{"field": F,
//! "value": V}`, `GET /v1/status`, `GET /v1/errors` (rows the adapters
//! quarantined), `GET /metrics`. Bodies are JSON; errors are `{"error": "..."}` with 400 (bad id or value),
//! 404 (not found) or 500. PUT replaces the record; PATCH is a JSON merge patch (a `null`
//! removes the field). Store calls block, so they run on the blocking pool; a write returns
//! once durable, then wakes the engine to ship it.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::runtime::{metrics_text, Shared};
use super::NodeError;
use crate::record::{Collection, Key, RecordId, RecordWrite};

/// Largest request body, in bytes.
pub const REQUEST_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most records one list request returns.
pub const LIST_LIMIT_MAX: usize = 10_000;
const LIST_LIMIT_DEFAULT: usize = 1000;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/records/{collection}", get(list))
        .route(
            "/v1/records/{collection}/{key}",
            get(get_record)
                .put(put_record)
                .patch(patch_record)
                .delete(delete_record),
        )
        .route("/v1/records/{collection}/{key}/history", get(history))
        .route(
            "/v1/records/{collection}/{key}/revert",
            axum::routing::post(revert_record),
        )
        .route(
            "/v1/records/{collection}/{key}/automerge",
            get(export).post(import),
        )
        .route("/v1/audit", get(audit))
        .route("/v1/conflicts", get(conflicts))
        .route(
            "/v1/records/{collection}/{key}/resolve",
            axum::routing::post(resolve_record),
        )
        .route("/v1/status", get(status))
        .route("/v1/errors", get(errors))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .with_state(shared)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        let status = match &error {
            NodeError::NotFound(_) => StatusCode::NOT_FOUND,
            NodeError::Record(_)
            | NodeError::BadVersion(_)
            | NodeError::BadTime(_)
            | NodeError::NoConflict { .. }
            | NodeError::NoCandidate { .. }
            | NodeError::UnknownVersion { .. }
            | NodeError::TooLarge { .. }
            | NodeError::Store(crate::store::StoreError::InvalidDocument(_)) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, error.to_string())
    }
}

fn bad_request(error: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, error.to_string())
}

fn record_id(collection: &str, key: &str) -> Result<RecordId, ApiError> {
    let collection = Collection::new_user(collection).map_err(bad_request)?;
    let key = Key::new(key).map_err(bad_request)?;
    Ok(RecordId::new(collection, key))
}

/// `value` as a JSON response body.
fn json_body(value: &impl serde::Serialize) -> Result<Json<Value>, ApiError> {
    serde_json::to_value(value)
        .map(Json)
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
        .map_err(ApiError::from)
}

#[derive(Deserialize)]
struct GetQuery {
    /// A version from the record's history: read the record as it was then.
    at: Option<String>,
}

async fn get_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    Query(query): Query<GetQuery>,
) -> Result<Json<Value>, ApiError> {
    let id = record_id(&collection, &key)?;
    let node = shared.node.clone();
    let fields = blocking(move || {
        let fields = match query.at {
            Some(version) => node.get_at(&id, &super::parse_version(&version)?)?,
            None => node.get(&id)?,
        };
        fields.ok_or(NodeError::NotFound(id))
    })
    .await?;
    Ok(Json(Value::Object(fields)))
}

#[derive(Deserialize)]
struct RevertBody {
    /// The version to restore, from the record's history.
    to: String,
}

async fn revert_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    Json(body): Json<RevertBody>,
) -> Result<Json<Value>, ApiError> {
    let id = record_id(&collection, &key)?;
    let version = super::parse_version(&body.to)?;
    let node = shared.node.clone();
    let changed = blocking(move || node.revert(&id, &version)).await?;
    if changed {
        shared.local_writes.notify_one();
    }
    Ok(Json(json!({"changed": changed})))
}

async fn write(
    shared: Arc<Shared>,
    id: RecordId,
    write: RecordWrite,
) -> Result<Json<Value>, ApiError> {
    let node = shared.node.clone();
    let changed = blocking(move || node.put(&id, &write)).await?;
    if changed {
        shared.local_writes.notify_one();
    }
    Ok(Json(json!({"changed": changed})))
}

async fn put_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    let id = record_id(&collection, &key)?;
    write(shared, id, RecordWrite::replace_with(body)).await
}

async fn patch_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    let id = record_id(&collection, &key)?;
    let mut patch = RecordWrite::default();
    for (field, value) in body {
        if value.is_null() {
            patch.remove.push(field);
        } else {
            patch.set.push((field, value));
        }
    }
    write(shared, id, patch).await
}

async fn delete_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = record_id(&collection, &key)?;
    let node = shared.node.clone();
    blocking(move || node.delete(&id)).await?;
    shared.local_writes.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Path(collection): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let collection = Collection::new(&collection).map_err(bad_request)?;
    let after = query
        .after
        .as_deref()
        .map(Key::new)
        .transpose()
        .map_err(bad_request)?;
    let limit = query
        .limit
        .unwrap_or(LIST_LIMIT_DEFAULT)
        .clamp(1, LIST_LIMIT_MAX);
    let node = shared.node.clone();
    let page = blocking(move || node.list(&collection, after.as_ref(), limit)).await?;
    let records: Vec<Value> = page
        .records
        .into_iter()
        .map(|(key, fields)| json!({"key": key.as_str(), "fields": fields}))
        .collect();
    Ok(Json(
        json!({"records": records, "next": page.last_seen.map(|key| key.as_str().to_owned())}),
    ))
}

async fn history(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let collection = Collection::new(&collection).map_err(bad_request)?;
    let id = RecordId::new(collection, Key::new(&key).map_err(bad_request)?);
    let node = shared.node.clone();
    let entries = blocking(move || node.history(&id)).await?;
    json_body(&entries)
}

async fn export(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let collection = Collection::new(&collection).map_err(bad_request)?;
    let id = RecordId::new(collection, Key::new(&key).map_err(bad_request)?);
    let node = shared.node.clone();
    let bytes = blocking(move || node.export(&id)).await?;
    Ok(([("content-type", "application/octet-stream")], bytes).into_response())
}

async fn import(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = record_id(&collection, &key)?;
    let node = shared.node.clone();
    let outcome = blocking(move || node.import(&id, &body)).await?;
    if outcome.new_changes > 0 {
        shared.local_writes.notify_one();
    }
    Ok(Json(json!({"new_changes": outcome.new_changes})))
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let status = shared.status_now();
    let node = shared.node.clone();
    let records = tokio::task::spawn_blocking(move || node.count_live_records())
        .await
        .ok()
        .and_then(Result::ok);
    let mut value = serde_json::to_value(status).unwrap_or_default();
    value["records"] = json!(records);
    Json(value)
}

#[derive(Deserialize)]
struct AuditQuery {
    collection: Option<String>,
    record: Option<String>,
    source: Option<String>,
    node: Option<String>,
    /// RFC 3339.
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
}

/// Entries an audit request returns when it does not say.
const AUDIT_LIMIT_DEFAULT: usize = 1000;

async fn audit(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let filter = super::AuditFilter {
        collection: query
            .collection
            .as_deref()
            .map(Collection::new)
            .transpose()
            .map_err(bad_request)?,
        record: query
            .record
            .as_deref()
            .map(RecordId::parse)
            .transpose()
            .map_err(bad_request)?,
        source: query.source,
        node: query.node,
        since: query.since.as_deref().map(super::parse_time).transpose()?,
        until: query.until.as_deref().map(super::parse_time).transpose()?,
        limit: query.limit.unwrap_or(AUDIT_LIMIT_DEFAULT),
    };
    let node = shared.node.clone();
    let report = blocking(move || node.audit(&filter)).await?;
    json_body(&report)
}

#[derive(Deserialize)]
struct ConflictsQuery {
    collection: Option<String>,
    limit: Option<usize>,
}

async fn conflicts(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<ConflictsQuery>,
) -> Result<Json<Value>, ApiError> {
    let collection = query
        .collection
        .as_deref()
        .map(Collection::new)
        .transpose()
        .map_err(bad_request)?;
    let limit = query.limit.unwrap_or(AUDIT_LIMIT_DEFAULT);
    let node = shared.node.clone();
    let report = blocking(move || node.conflicts(collection.as_ref(), limit)).await?;
    json_body(&report)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    field: String,
    /// A candidate's index, as `/v1/conflicts` lists them.
    pick: Option<usize>,
    /// Or a value of one's own.
    value: Option<Value>,
}

async fn resolve_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    Json(body): Json<ResolveBody>,
) -> Result<Json<Value>, ApiError> {
    let id = record_id(&collection, &key)?;
    let settlement = match (body.pick, body.value) {
        (Some(index), None) => super::Settlement::Pick(index),
        (None, Some(value)) => super::Settlement::Value(value),
        _ => return Err(bad_request("give exactly one of \"pick\" and \"value\"")),
    };
    let node = shared.node.clone();
    let field = body.field;
    let value = blocking(move || node.resolve(&id, &field, &settlement)).await?;
    shared.local_writes.notify_one();
    Ok(Json(json!({"value": value})))
}

/// Most quarantined rows one errors request lists.
pub const ERRORS_LIST_MAX: usize = 10_000;

async fn errors(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let node = shared.node.clone();
    let rows = tokio::task::spawn_blocking(move || {
        crate::adapters::driver::quarantined_rows(&node, ERRORS_LIST_MAX)
    })
    .await
    .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
    .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    Ok(Json(json!({ "errors": rows })))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        metrics_text(&shared),
    )
}
