//! `POST /v1/query` with `{"sql": "..."}`. The answer's format follows `Accept`: JSON by
//! default, `text/csv`, or an Arrow IPC stream (`application/vnd.apache.arrow.stream`).
//! Errors are JSON: `{"error": {"kind", "message", "line", "column"}}`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use datafusion::arrow::csv::WriterBuilder as CsvWriterBuilder;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::json::ArrayWriter;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Denied, Keys};
use crate::{Output, QueryError, Served};

/// The media type of an Arrow IPC stream.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// What the HTTP front door needs.
#[derive(Debug, Clone)]
pub struct Api {
    served: Served,
    keys: Keys,
}

#[derive(Debug, Deserialize)]
struct Request {
    sql: String,
}

impl Api {
    /// Serves `engine` (one [`Engine`](crate::Engine), or whichever [`Served`] holds at each
    /// query), admitting keys of `keys`.
    pub fn new(engine: impl Into<Served>, keys: Keys) -> Api {
        Api {
            served: engine.into(),
            keys,
        }
    }

    /// The routes: `POST /v1/query`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/query", post(query))
            .with_state(self)
    }
}

fn error(status: StatusCode, kind: &str, message: &str, position: Option<(u64, u64)>) -> Response {
    let mut body = json!({"kind": kind, "message": message});
    if let Some((line, column)) = position {
        body["line"] = json!(line);
        body["column"] = json!(column);
    }
    (status, axum::Json(json!({ "error": body }))).into_response()
}

fn query_error(e: &QueryError) -> Response {
    let (status, position) = match e {
        QueryError::Invalid { position, .. } => (StatusCode::BAD_REQUEST, *position),
        QueryError::ReadOnly(_) => (StatusCode::BAD_REQUEST, None),
        QueryError::Limit(_) => (StatusCode::UNPROCESSABLE_ENTITY, None),
        QueryError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, None),
        QueryError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
    };
    error(status, e.kind(), &e.to_string(), position)
}

async fn query(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "missing Authorization: Bearer <API key>",
            None,
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    match api.keys.may_query(token).await {
        Ok(_) => {}
        Err(Denied::Unauthenticated(m)) => {
            return error(StatusCode::UNAUTHORIZED, "unauthenticated", &m, None);
        }
        Err(Denied::Forbidden(m)) => return error(StatusCode::FORBIDDEN, "forbidden", &m, None),
        Err(e @ Denied::Unavailable(_)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
                None,
            );
        }
    }
    let request: Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("the body must be JSON {{\"sql\": \"...\"}}: {e}"),
                None,
            );
        }
    };
    let output = match api.served.engine().query(&request.sql).await {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(error = %e, "query refused");
            return query_error(&e);
        }
    };
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let encoded = if accept.contains(ARROW_STREAM) {
        arrow_stream(&output).map(|b| (ARROW_STREAM, b))
    } else if accept.contains("text/csv") {
        csv(&output).map(|b| ("text/csv; charset=utf-8", b))
    } else {
        json_body(&output).map(|b| ("application/json", b))
    };
    match encoded {
        Ok((content_type, bytes)) => {
            let mut r = (StatusCode::OK, bytes).into_response();
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            h.insert("sluice-rows", HeaderValue::from(output.rows()));
            h.insert(
                "sluice-truncated",
                HeaderValue::from_static(if output.truncated { "true" } else { "false" }),
            );
            r
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("cannot encode the result: {e}"),
            None,
        ),
    }
}

/// `{"columns": [{"name", "type"}], "rows": [{...}], "row_count", "truncated", "elapsed_ms"}`.
pub fn json_body(output: &Output) -> Result<Vec<u8>, datafusion::arrow::error::ArrowError> {
    let mut rows = ArrayWriter::new(Vec::new());
    for b in &output.batches {
        rows.write(b)?;
    }
    rows.finish()?;
    let mut rows = rows.into_inner();
    if rows.is_empty() {
        rows = b"[]".to_vec();
    }
    let columns: Vec<_> = output
        .schema
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
        .collect();
    let head = json!({
        "columns": columns,
        "row_count": output.rows(),
        "truncated": output.truncated,
        "elapsed_ms": output.elapsed.as_secs_f64() * 1000.0,
    })
    .to_string();
    // Splice the rows, already JSON, into the object.
    let mut out = Vec::with_capacity(head.len() + rows.len() + 16);
    out.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    out.extend_from_slice(b",\"rows\":");
    out.extend_from_slice(&rows);
    out.push(b'}');
    Ok(out)
}

/// CSV with a header line (also when there are no rows).
pub fn csv(output: &Output) -> Result<Vec<u8>, datafusion::arrow::error::ArrowError> {
    let mut w = CsvWriterBuilder::new().with_header(true).build(Vec::new());
    for b in &output.batches {
        w.write(b)?;
    }
    let mut bytes = w.into_inner();
    if output.batches.is_empty() {
        let names: Vec<&str> = output
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        bytes = format!("{}\n", names.join(",")).into_bytes();
    }
    Ok(bytes)
}

fn arrow_stream(output: &Output) -> Result<Vec<u8>, datafusion::arrow::error::ArrowError> {
    let mut w = StreamWriter::try_new(Vec::new(), &output.schema)?;
    for b in &output.batches {
        w.write(b)?;
    }
    w.finish()?;
    w.into_inner()
}
