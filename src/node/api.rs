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
//! "value": V}`, `POST /v1/batch` with `{"writes": [{"id": "COLLECTION/KEY", "fields": {...},
//! "replace": false}, ...]}` (many writes, one flush, all or none), `GET /v1/status`, `GET /v1/errors` (rows the adapters
//! quarantined), `GET /metrics`. Bodies are JSON; errors are `{"error": "..."}` with 400 (bad id or value),
//! 404 (not found), 413 (a body or a write over its limit: nothing was stored), 503 (the node
//! cannot keep up just now; `Retry-After` says when to try again) 507 (the disk is full: writes resume by themselves once it has room) or 500. PUT replaces the record; PATCH is a JSON merge patch (a `null`
//! removes the field; nested objects merge key by key). Store calls block, so they run on the blocking pool; a write returns
//! once durable, and the store wakes the engine to ship it.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::metrics::metrics_text;
use super::shared::{Refusal, Shared, RETRY_AFTER_SECONDS};
use super::{NodeError, IMPORT_BYTES_MAX};
use crate::record::document::CHANGE_BYTES_MAX;
use crate::record::{Collection, Key, RecordError, RecordId, RecordWrite};
use crate::store::StoreError;

/// Largest request body, in bytes (the Automerge import excepted): twice the largest change,
/// so that every write a change can hold fits, escaped as JSON.
pub const REQUEST_BYTES_MAX: usize = 2 * CHANGE_BYTES_MAX;
const _: () = assert!(REQUEST_BYTES_MAX >= CHANGE_BYTES_MAX);
// A signed grant or revocation comes in through the API in one request body.
const _: () = assert!(crate::scope::SIGNED_BYTES_MAX <= REQUEST_BYTES_MAX);
/// A request whose body may be larger than this (by its `Content-Length`, or without one)
/// is a large write: large writes go one at a time, so that however many arrive at once a
/// small write waits behind one of them at most, and only one large body is held in memory.
pub const LARGE_BODY_BYTES: usize = 1024 * 1024;
/// Writes (requests with a body) served at once; more wait their turn. With
/// [`LARGE_BODY_BYTES`] this bounds the bodies held in memory.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;
const _: () = assert!(LARGE_BODY_BYTES < REQUEST_BYTES_MAX);
const _: () = assert!(IMPORT_BYTES_MAX >= REQUEST_BYTES_MAX);
/// Most records one list request returns.
pub const LIST_LIMIT_MAX: usize = 10_000;
const LIST_LIMIT_DEFAULT: usize = 1000;

/// The turns writes take: all of them, and large ones apart.
struct Turns {
    requests: tokio::sync::Semaphore,
    large: tokio::sync::Semaphore,
}

/// Waits for a request's turn, then serves it. Only requests that carry a body (writes) take
/// turns: reads, status and metrics never wait behind writes.
async fn take_turns(
    State(turns): State<Arc<Turns>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let with_body = !matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::DELETE
    );
    if !with_body {
        return next.run(request).await;
    }
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    // Refused from its headers, before any of the body is read: a client that asked
    // `Expect: 100-continue` (curl does for large bodies) never sends it.
    let limit = if request.uri().path().ends_with("/automerge") {
        IMPORT_BYTES_MAX
    } else {
        REQUEST_BYTES_MAX
    };
    if length.is_some_and(|length| length > limit) {
        return too_large(limit).into_response();
    }
    let shutting_down =
        || ApiError(StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned()).into_response();
    let Ok(_turn) = turns.requests.acquire().await else {
        return shutting_down();
    };
    let _large_turn = if length.is_none_or(|length| length > LARGE_BODY_BYTES) {
        match turns.large.acquire().await {
            Ok(turn) => Some(turn),
            Err(_) => return shutting_down(),
        }
    } else {
        None
    };
    next.run(request).await
}

/// Longest text of the framework's own rejections (a bad query, path or header) that an
/// error answer repeats.
const REJECTION_TEXT_BYTES_MAX: usize = 4096;

/// A path that names no endpoint. A key holding `/` must be sent encoded (`%2F`), or its
/// path names no record.
async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint at {}: a record is /v1/records/COLLECTION/KEY, with a `/` inside \
             the key sent as %2F",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// Every error answers `{"error": "..."}`: the framework's own rejections (a query, a path
/// or a header it could not read) answer in plain text, and are rewritten here.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, REJECTION_TEXT_BYTES_MAX).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let mut rewritten = ApiError(status, text).into_response();
    for name in [header::RETRY_AFTER, header::ALLOW] {
        if let Some(value) = parts.headers.get(&name) {
            rewritten.headers_mut().insert(name, value.clone());
        }
    }
    rewritten
}

pub fn router(shared: Arc<Shared>) -> Router {
    let turns = Arc::new(Turns {
        requests: tokio::sync::Semaphore::new(REQUESTS_IN_FLIGHT_MAX),
        large: tokio::sync::Semaphore::new(1),
    });
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
            get(export)
                .post(import)
                .layer(DefaultBodyLimit::max(IMPORT_BYTES_MAX)),
        )
        .route("/v1/audit", get(audit))
        .route("/v1/conflicts", get(conflicts))
        .route(
            "/v1/records/{collection}/{key}/resolve",
            axum::routing::post(resolve_record),
        )
        .route("/v1/status", get(status))
        .route("/v1/errors", get(errors))
        .route("/v1/refused", get(refused))
        .route("/v1/grants", get(grants).post(add_signed))
        .route("/v1/nodes/{name}", get(node_named))
        .route(
            "/v1/bindings/{name}/refill",
            axum::routing::post(refill_binding),
        )
        .route("/v1/batch", axum::routing::post(batch))
        .route("/v1/backup", get(backup))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(REQUEST_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(turns, take_turns))
        .with_state(shared)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(json!({"error": self.1}))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, RETRY_AFTER_SECONDS.into());
        }
        response
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let message = match refusal {
            Refusal::Overloaded => {
                "the node cannot keep up with writes just now: retry after a \
                                    moment (see `overloaded` in /v1/status)"
            }
            Refusal::EngineDown => "the node's replication engine stopped: it accepts no writes",
        };
        Self(StatusCode::SERVICE_UNAVAILABLE, message.to_owned())
    }
}

/// A body that is not the JSON expected, or too large, answered as JSON like every error.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => return too_large(REQUEST_BYTES_MAX),
            // A body of the wrong shape is as bad a request as one that is not JSON.
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            status => status,
        };
        Self(status, rejection.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return too_large(IMPORT_BYTES_MAX);
        }
        Self(status, rejection.body_text())
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is over the limit of {limit} bytes; nothing was stored"),
    )
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        let message = error.to_string();
        Self(status_of(&error), message)
    }
}

/// The status an error answers with; a batch's failed write answers as that write would.
fn status_of(error: &NodeError) -> StatusCode {
    match error {
        NodeError::InBatch { error, .. } => status_of(error),
        NodeError::NotFound(_) => StatusCode::NOT_FOUND,
        NodeError::Store(StoreError::OutsideGrant(_)) => StatusCode::FORBIDDEN,
        NodeError::TooLarge { .. }
        | NodeError::Record(RecordError::WriteTooLarge { .. })
        | NodeError::Record(RecordError::TooManyValues { .. })
        | NodeError::Store(StoreError::ChangeTooLarge { .. })
        | NodeError::Store(StoreError::Record(RecordError::WriteTooLarge { .. }))
        | NodeError::Store(StoreError::Record(RecordError::TooManyValues { .. })) => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        NodeError::Record(_)
        | NodeError::BadVersion(_)
        | NodeError::BadTime(_)
        | NodeError::ZeroLimit
        | NodeError::Revoked(_)
        | NodeError::AlreadyRevoked(_)
        | NodeError::Removed(_)
        | NodeError::AlreadyRemoved(_)
        | NodeError::NoConflict { .. }
        | NodeError::NoCandidate { .. }
        | NodeError::UnknownVersion { .. }
        | NodeError::Store(crate::store::StoreError::InvalidDocument(_))
        | NodeError::Store(StoreError::Record(_))
        | NodeError::Store(StoreError::ClockAhead { .. }) => StatusCode::BAD_REQUEST,
        NodeError::Store(StoreError::DiskFull(_) | StoreError::Closed) => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        NodeError::Store(StoreError::Io(io)) if super::disk::is_disk_full(io) => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
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

/// Every write of the API goes through here: refused at once (503) while the node cannot
/// keep up, else run on the blocking pool. (Once durable, the store wakes the engine.)
async fn writing<T: Send + 'static>(
    shared: &Shared,
    work: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, ApiError> {
    shared.admit_write()?;
    blocking(work).await
}

/// A query parameter given with no value (`?limit=`) counts as not given, as the README
/// shows queries (`/v1/audit?collection=&record=...`); any other value must parse.
fn empty_is_none<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text: Option<String> = Option::deserialize(deserializer)?;
    match text.as_deref() {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|error| serde::de::Error::custom(format!("{text:?}: {error}"))),
    }
}

#[derive(Deserialize)]
struct GetQuery {
    /// A version from the record's history: read the record as it was then.
    #[serde(default, deserialize_with = "empty_is_none")]
    at: Option<String>,
}

async fn get_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    Query(query): Query<GetQuery>,
) -> Result<Json<Value>, ApiError> {
    // Concord's own collections read as `list` and `history` read them; only writes are
    // reserved.
    let collection = Collection::new(&collection).map_err(bad_request)?;
    let id = RecordId::new(collection, Key::new(&key).map_err(bad_request)?);
    let node = shared.node.clone();
    let fields = blocking(move || {
        let fields = match query.at {
            Some(version) => node.get_at(&id, &node.resolve_version(&id, &version)?)?,
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
    body: Result<Json<RevertBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let id = record_id(&collection, &key)?;
    let node = shared.node.clone();
    let changed = writing(&shared, move || {
        node.revert(&id, &node.resolve_version(&id, &body.to)?)
    })
    .await?;
    Ok(Json(json!({"changed": changed})))
}

async fn write(
    shared: Arc<Shared>,
    id: RecordId,
    write: RecordWrite,
) -> Result<Json<Value>, ApiError> {
    let node = shared.node.clone();
    let changed = writing(&shared, move || node.put(&id, &write)).await?;
    Ok(Json(json!({"changed": changed})))
}

async fn put_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let id = record_id(&collection, &key)?;
    write(shared, id, RecordWrite::replace_with(body)).await
}

async fn patch_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let id = record_id(&collection, &key)?;
    write(shared, id, RecordWrite::merge_patch(body)).await
}

/// Most writes one `POST /v1/batch` carries.
pub const BATCH_WRITES_MAX: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchWrite {
    /// `COLLECTION/KEY`.
    id: String,
    fields: Map<String, Value>,
    /// Replace the record with exactly `fields` (as PUT), instead of merging them in (as
    /// PATCH).
    #[serde(default)]
    replace: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    writes: Vec<BatchWrite>,
}

/// `POST /v1/batch`: many writes, durable together by one flush, all or none: a write that
/// breaks a rule refuses the batch, naming it by its index.
async fn batch(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<BatchBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    if body.writes.len() > BATCH_WRITES_MAX {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a batch of {} writes is over the limit of {BATCH_WRITES_MAX}",
                body.writes.len()
            ),
        ));
    }
    let mut writes = Vec::with_capacity(body.writes.len());
    for (index, entry) in body.writes.into_iter().enumerate() {
        let id = RecordId::parse_user(&entry.id)
            .map_err(|error| bad_request(format!("write {index}: {error}")))?;
        let write = if entry.replace {
            RecordWrite::replace_with(entry.fields)
        } else {
            RecordWrite::merge_patch(entry.fields)
        };
        writes.push((id, write));
    }
    let node = shared.node.clone();
    let count = writes.len();
    let changed = writing(&shared, move || {
        node.put_many(writes.iter().map(|(id, write)| (id, write)))
    })
    .await?;
    Ok(Json(json!({"written": count, "changed": changed})))
}

async fn delete_record(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = record_id(&collection, &key)?;
    let node = shared.node.clone();
    writing(&shared, move || node.delete(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default, deserialize_with = "empty_is_none")]
    after: Option<String>,
    #[serde(default, deserialize_with = "empty_is_none")]
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
        .min(LIST_LIMIT_MAX);
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// The last change of the page before (its hash, or 8+ of its hex digits).
    #[serde(default, deserialize_with = "empty_is_none")]
    after: Option<String>,
    #[serde(default, deserialize_with = "empty_is_none")]
    limit: Option<usize>,
}

/// Changes one history page lists when the request does not say.
const HISTORY_LIMIT_DEFAULT: usize = 1000;

/// `GET .../history?after=HASH&limit=N`: a page of the record's changes, in causal order;
/// the next page is the one after the last hash of this one, and a page shorter than its
/// limit is the last.
async fn history(
    State(shared): State<Arc<Shared>>,
    Path((collection, key)): Path<(String, String)>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let collection = Collection::new(&collection).map_err(bad_request)?;
    let id = RecordId::new(collection, Key::new(&key).map_err(bad_request)?);
    let limit = query
        .limit
        .unwrap_or(HISTORY_LIMIT_DEFAULT)
        .min(LIST_LIMIT_MAX);
    let node = shared.node.clone();
    let entries = blocking(move || {
        let after = query
            .after
            .map(|text| node.resolve_version(&id, &text))
            .transpose()?;
        node.history(&id, after.as_ref(), limit)
    })
    .await?;
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
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body?;
    let id = record_id(&collection, &key)?;
    let node = shared.node.clone();
    let outcome = writing(&shared, move || node.import(&id, &body)).await?;
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
    let grants = shared.node.grants();
    // Each node's standing: its grant (none: it reads and writes everything), or revoked.
    let standing = |node: &Value| {
        let grant = grants
            .iter()
            .find(|grant| &grant["node"] == node && grant["revoked"] != json!(true));
        let revoked = grants
            .iter()
            .any(|grant| &grant["node"] == node && grant["revoked"] == json!(true));
        (
            grant.map_or(
                Value::Null,
                |grant| json!({"read": grant["read"], "write": grant["write"]}),
            ),
            revoked,
        )
    };
    let (grant, revoked) = standing(&value["node"]);
    value["grant"] = grant;
    value["revoked"] = json!(revoked);
    if let Some(peers) = value["peers"].as_array_mut() {
        for peer in peers {
            let (grant, revoked) = standing(&peer["node"]);
            peer["grant"] = grant;
            peer["revoked"] = json!(revoked);
        }
    }
    value["grants"] = json!(grants);
    Json(value)
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default, deserialize_with = "empty_is_none")]
    collection: Option<String>,
    #[serde(default, deserialize_with = "empty_is_none")]
    record: Option<String>,
    #[serde(default, deserialize_with = "empty_is_none")]
    source: Option<String>,
    #[serde(default, deserialize_with = "empty_is_none")]
    node: Option<String>,
    /// RFC 3339.
    #[serde(default, deserialize_with = "empty_is_none")]
    since: Option<String>,
    #[serde(default, deserialize_with = "empty_is_none")]
    until: Option<String>,
    #[serde(default, deserialize_with = "empty_is_none")]
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
    #[serde(default, deserialize_with = "empty_is_none")]
    collection: Option<String>,
    #[serde(default, deserialize_with = "empty_is_none")]
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
    body: Result<Json<ResolveBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let id = record_id(&collection, &key)?;
    let settlement = match (body.pick, body.value) {
        (Some(index), None) => super::Settlement::Pick(index),
        (None, Some(value)) => super::Settlement::Value(value),
        _ => return Err(bad_request("give exactly one of \"pick\" and \"value\"")),
    };
    let node = shared.node.clone();
    let field = body.field;
    let value = writing(&shared, move || node.resolve(&id, &field, &settlement)).await?;
    Ok(Json(json!({"value": value})))
}

/// Most quarantined rows one errors request lists.
pub const ERRORS_LIST_MAX: usize = 10_000;

async fn errors(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let node = shared.node.clone();
    let rows = tokio::task::spawn_blocking(move || {
        crate::adapters::driver::quarantined_rows(node.as_ref(), ERRORS_LIST_MAX)
    })
    .await
    .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
    .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    // The times as RFC 3339 too, for people; the ms fields stay for programs.
    let rfc3339 = |ms: u64| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    };
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let (first_seen, next_retry) = (rfc3339(row.first_seen_ms), rfc3339(row.next_retry_ms));
            let mut value = json!(row);
            value["first_seen"] = json!(first_seen);
            value["next_retry"] = json!(next_retry);
            value
        })
        .collect();
    Ok(Json(json!({ "errors": rows })))
}

async fn node_named(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = shared.node.clone();
    let found = tokio::task::spawn_blocking(move || {
        let id = node.node_named(&name)?;
        Ok::<_, NodeError>((id, node.writers_of(id)?))
    })
    .await
    .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
    .map_err(|error| match error {
        NodeError::UnknownNode(_) => ApiError(StatusCode::NOT_FOUND, error.to_string()),
        other => other.into(),
    })?;
    let (id, writers) = found;
    let writers: serde_json::Map<String, Value> = writers
        .into_iter()
        .map(|(writer, mark)| (writer.to_string(), json!(mark)))
        .collect();
    Ok(Json(json!({ "node": id.to_string(), "writers": writers })))
}

async fn grants(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({ "grants": shared.node.grants() }))
}

/// A signed grant or revocation (its bytes, as `concord grant` makes them), stored once it
/// verifies against the cluster CA.
async fn add_signed(
    State(shared): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let node = shared.node.clone();
    tokio::task::spawn_blocking(move || node.add_signed(&body))
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
        .map_err(|error| match error {
            NodeError::Scope(scope) => ApiError(StatusCode::BAD_REQUEST, scope.to_string()),
            other => other.into(),
        })?;
    Ok(Json(json!({ "stored": true })))
}

async fn refill_binding(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = shared.node.clone();
    tokio::task::spawn_blocking(move || crate::adapters::driver::refill(node.as_ref(), &name))
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
        .map_err(|error| match error {
            crate::adapters::AdapterError::Config(message) => {
                ApiError(StatusCode::NOT_FOUND, message)
            }
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        })?;
    Ok(Json(json!({ "refilling": true })))
}

async fn refused(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let node = shared.node.clone();
    let refused =
        tokio::task::spawn_blocking(move || node.refused_changes(crate::store::REFUSED_LISTED_MAX))
            .await
            .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
            .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    Ok(Json(json!({ "refused": refused })))
}

/// Backups streamed at once: each reads the whole store.
pub const BACKUPS_AT_ONCE: usize = 1;
/// Chunks of a backup between the store and the connection, at most, and their size: a
/// backup of any store holds about a MiB in memory.
const BACKUP_CHUNKS_IN_FLIGHT: usize = 16;
const BACKUP_CHUNK_BYTES: usize = 64 * 1024;

/// Hands what is written to it on to a bounded channel, in chunks; fails once the receiver
/// is gone (the client went away), which stops the backup.
struct ChunkWriter {
    chunk: Vec<u8>,
    sender: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(BACKUP_CHUNK_BYTES));
        self.sender
            .blocking_send(Ok(bytes::Bytes::from(chunk)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.chunk.extend_from_slice(bytes);
        if self.chunk.len() >= BACKUP_CHUNK_BYTES {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// The receiving end of a backup's chunks, as a body stream.
struct ChunkStream(tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>);

impl futures_core::Stream for ChunkStream {
    type Item = std::io::Result<bytes::Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(context)
    }
}

/// `GET /v1/backup`: the store in the backup format, streamed while the node goes on.
async fn backup(State(shared): State<Arc<Shared>>) -> Result<Response, ApiError> {
    let Ok(turn) = shared.backups.clone().try_acquire_owned() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "a backup is being taken already".to_owned(),
        ));
    };
    let node = shared.node.clone();
    let files = super::maintenance::backup_files(node.dir())
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    let (sender, receiver) = tokio::sync::mpsc::channel(BACKUP_CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut writer = ChunkWriter {
            chunk: Vec::with_capacity(BACKUP_CHUNK_BYTES),
            sender: sender.clone(),
        };
        let written = crate::store::backup::write_backup(
            node.documents().backend(),
            &files,
            &mut writer,
            |_| {},
        );
        match written {
            Ok(records) => tracing::info!(records, "backup streamed"),
            Err(error) => {
                tracing::warn!(%error, "backup stopped");
                // The stream ends in an error, so the client sees the backup is not whole.
                let _ = sender.blocking_send(Err(std::io::Error::other(error.to_string())));
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(ChunkStream(receiver)),
    )
        .into_response())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        metrics_text(&shared),
    )
}
