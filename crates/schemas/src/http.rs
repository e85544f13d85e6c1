//! The subset of the Confluent Schema Registry REST API that Kafka clients and
//! `schema_registry_converter` use, served over [`Registry`].

use std::future::Future;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::registry::{Registry, VersionRef};
use crate::{Compatibility, Error};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

type Shared = State<Arc<Registry>>;

/// The registry's routes.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/", get(|| async { reply(StatusCode::OK, json!({})) }))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(compatible_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatible_latest),
        )
        .route("/config", get(get_default_config).put(put_default_config))
        .route("/config/{subject}", get(get_config).put(put_config))
        .with_state(registry)
}

/// Serves the registry on `listener` until `shutdown` resolves.
pub async fn serve(
    registry: Arc<Registry>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry))
        .with_graceful_shutdown(shutdown)
        .await
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
}

/// An error in the registry API's shape: `{"error_code": 40401, "message": "..."}`.
struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        let (status, code) = match e {
            Error::SubjectNotFound(_) => (StatusCode::NOT_FOUND, 40401),
            Error::VersionNotFound { .. } => (StatusCode::NOT_FOUND, 40402),
            Error::SchemaNotFound(_) | Error::SchemaNotInSubject(_) => {
                (StatusCode::NOT_FOUND, 40403)
            }
            Error::Incompatible { .. } => (StatusCode::CONFLICT, 409),
            Error::InvalidSubject(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42208),
            Error::InvalidSchema(_) | Error::Avro(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42201),
            Error::Storage { .. } | Error::Corrupt { .. } | Error::Remote(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, 50001)
            }
            Error::Wire(_) | Error::Payload { .. } | Error::Envelope(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, 422)
            }
        };
        Self {
            status,
            code,
            message,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("invalid request body: {}", e.body_text()),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        reply(
            self.status,
            json!({"error_code": self.code, "message": self.message}),
        )
    }
}

type ApiResult = Result<Response, ApiError>;

/// The body of a registration, lookup or compatibility check.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Value>,
    // Confluent 7+ clients may send these; they carry nothing Sluice keeps.
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    rule_set: Option<Value>,
}

impl SchemaBody {
    fn avro(self) -> Result<String, ApiError> {
        match self.schema_type.as_deref() {
            None | Some("AVRO") => {}
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    42201,
                    format!("schema type {other} is not supported: Sluice's registry holds AVRO"),
                ));
            }
        }
        if !self.references.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                "schema references are not supported by Sluice's registry",
            ));
        }
        Ok(self.schema)
    }
}

fn parse_version(text: &str) -> Result<VersionRef, ApiError> {
    match text {
        "latest" | "-1" => Ok(VersionRef::Latest),
        n => match n.parse::<u32>() {
            Ok(v) if v >= 1 => Ok(VersionRef::Number(v)),
            _ => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                42202,
                format!(
                    "the specified version {n:?} is not a valid version id: use a positive integer or \"latest\""
                ),
            )),
        },
    }
}

async fn subjects(State(r): Shared) -> ApiResult {
    Ok(reply(StatusCode::OK, json!(r.subjects())))
}

async fn versions(State(r): Shared, Path(subject): Path<String>) -> ApiResult {
    Ok(reply(StatusCode::OK, json!(r.versions(&subject)?)))
}

async fn register(
    State(r): Shared,
    Path(subject): Path<String>,
    body: Result<Json<SchemaBody>, JsonRejection>,
) -> ApiResult {
    let schema = body?.0.avro()?;
    // Registration fsyncs the registry file: keep it off the async workers.
    let registered = tokio::task::spawn_blocking(move || r.register(&subject, &schema))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, 50001, e.to_string()))??;
    tracing::info!(subject = %registered.subject, version = registered.version, id = registered.id, "schema registered");
    Ok(reply(StatusCode::OK, json!({"id": registered.id})))
}

#[derive(Deserialize)]
struct LookupQuery {
    #[serde(default)]
    #[allow(dead_code)]
    deleted: Option<bool>,
}

async fn lookup(
    State(r): Shared,
    Path(subject): Path<String>,
    Query(_): Query<LookupQuery>,
    body: Result<Json<SchemaBody>, JsonRejection>,
) -> ApiResult {
    let schema = body?.0.avro()?;
    let found = r.lookup(&subject, &schema)?;
    Ok(reply(
        StatusCode::OK,
        json!({"subject": found.subject, "id": found.id, "version": found.version, "schema": found.schema}),
    ))
}

async fn version(State(r): Shared, Path((subject, version)): Path<(String, String)>) -> ApiResult {
    let found = r.version(&subject, parse_version(&version)?)?;
    Ok(reply(
        StatusCode::OK,
        json!({"subject": found.subject, "id": found.id, "version": found.version, "schema": found.schema}),
    ))
}

async fn schema_by_id(
    State(r): Shared,
    Path(id): Path<String>,
    Query(_): Query<LookupQuery>,
) -> ApiResult {
    let id = id.parse::<u32>().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            40403,
            format!("schema {id} not found"),
        )
    })?;
    Ok(reply(StatusCode::OK, json!({"schema": r.schema(id)?})))
}

#[derive(Deserialize)]
struct CompatQuery {
    #[serde(default)]
    verbose: Option<bool>,
}

fn compat_reply(messages: Vec<String>, verbose: bool) -> Response {
    let mut body = json!({"is_compatible": messages.is_empty()});
    if verbose || !messages.is_empty() {
        body["messages"] = json!(messages);
    }
    reply(StatusCode::OK, body)
}

async fn compatible_latest(
    State(r): Shared,
    Path((subject, version)): Path<(String, String)>,
    Query(q): Query<CompatQuery>,
    body: Result<Json<SchemaBody>, JsonRejection>,
) -> ApiResult {
    let schema = body?.0.avro()?;
    match parse_version(&version)? {
        VersionRef::Latest => {}
        VersionRef::Number(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                42202,
                "compatibility is checked against \"latest\" or all versions",
            ));
        }
    }
    r.version(&subject, VersionRef::Latest)?;
    let messages = r.check(&subject, &schema, true)?;
    Ok(compat_reply(messages, q.verbose.unwrap_or(false)))
}

async fn compatible_all(
    State(r): Shared,
    Path(subject): Path<String>,
    Query(q): Query<CompatQuery>,
    body: Result<Json<SchemaBody>, JsonRejection>,
) -> ApiResult {
    let schema = body?.0.avro()?;
    let messages = r.check(&subject, &schema, false)?;
    Ok(compat_reply(messages, q.verbose.unwrap_or(false)))
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: String,
}

fn level(body: Result<Json<ConfigBody>, JsonRejection>) -> Result<Compatibility, ApiError> {
    body?
        .0
        .compatibility
        .parse()
        .map_err(|m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, 42203, m))
}

async fn get_default_config(State(r): Shared) -> ApiResult {
    Ok(reply(
        StatusCode::OK,
        json!({"compatibilityLevel": r.compatibility(None).as_str()}),
    ))
}

async fn put_default_config(
    State(r): Shared,
    body: Result<Json<ConfigBody>, JsonRejection>,
) -> ApiResult {
    let level = level(body)?;
    r.set_compatibility(None, level)?;
    Ok(reply(
        StatusCode::OK,
        json!({"compatibility": level.as_str()}),
    ))
}

async fn get_config(State(r): Shared, Path(subject): Path<String>) -> ApiResult {
    Ok(reply(
        StatusCode::OK,
        json!({"compatibilityLevel": r.compatibility(Some(&subject)).as_str()}),
    ))
}

async fn put_config(
    State(r): Shared,
    Path(subject): Path<String>,
    body: Result<Json<ConfigBody>, JsonRejection>,
) -> ApiResult {
    let level = level(body)?;
    r.set_compatibility(Some(&subject), level)?;
    Ok(reply(
        StatusCode::OK,
        json!({"compatibility": level.as_str()}),
    ))
}
