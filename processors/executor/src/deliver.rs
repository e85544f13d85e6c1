//! One delivery attempt: sign, POST, classify.
//!
//! [`Deliverer::attempt`] checks the destination policy, asks the endpoint's breaker, signs the
//! body (Standard Webhooks), POSTs it with the endpoint's timeout and classifies the outcome
//! for the ledger. It never retries by itself: the executor loop schedules retries with
//! [`backoff`] so a slow endpoint never holds up others.
//!
//! Classification:
//! - 2xx: [`Status::Delivered`].
//! - 4xx other than 408, 425 and 429: [`Status::Failed`] with `retryable: false`. The receiver
//!   judged the request itself wrong (unknown path, bad signature, rejected payload); the same
//!   signed bytes sent again within the retry schedule would be judged the same, so the action
//!   goes to the DLQ at once, where an operator can re-drive it after fixing the cause.
//! - Any other answer (5xx, 408, 425, 429, an unfollowed 3xx), a timeout, a refused or reset
//!   connection, a DNS or TLS error: [`Status::Failed`] with `retryable: true`.
//! - A destination the policy refuses, at the start or at a redirect or at DNS resolution:
//!   [`Status::Refused`], never retried: it would be refused again until the config changes.
//! - Breaker open: [`Status::ShortCircuited`], with no request sent.
//!
//! Every failure and every in-flight refusal counts against the breaker: an endpoint that
//! answers 404 or now resolves to a private address is as unusable as one that is down.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use sluice_topology::{Endpoint, ExecutorConfig};

use crate::breaker::{Admit, Breaker};
use crate::guard::{Destinations, GuardedResolver, Refusal, redirect_policy};
use crate::sign::{Secret, sign};
use crate::{Error, Result};

/// How much of a response body is read: enough to keep the connection reusable for the usual
/// short answers, and to quote an error. Longer bodies are dropped with their connection.
const MAX_BODY_READ: usize = 64 * 1024;
/// How much of a failed answer's body is quoted in the attempt's error.
const MAX_QUOTE: usize = 200;

/// An endpoint ready for delivery: its configuration, parsed URL, signing secret and breaker.
#[derive(Debug)]
pub struct ResolvedEndpoint {
    endpoint: Endpoint,
    url: Url,
    secret: Secret,
    breaker: Breaker,
}

impl ResolvedEndpoint {
    /// An endpoint with an explicit secret. Fails if the URL does not parse.
    pub fn new(endpoint: Endpoint, secret: Secret, breaker: Breaker) -> Result<Self> {
        let url = Url::parse(&endpoint.url).map_err(|e| Error::Url {
            endpoint: endpoint.name.clone(),
            url: endpoint.url.clone(),
            reason: e.to_string(),
        })?;
        Ok(ResolvedEndpoint {
            endpoint,
            url,
            secret,
            breaker,
        })
    }

    /// An endpoint whose secret is read from the environment variable named by `secret_env`.
    /// A missing or invalid secret is an error naming the variable (never showing its value).
    pub fn from_env(endpoint: Endpoint, breaker: Breaker) -> Result<Self> {
        let value = std::env::var(&endpoint.secret_env);
        Self::with_secret_var(endpoint, breaker, value)
    }

    /// Like [`ResolvedEndpoint::from_env`], with variables looked up by `vars`.
    pub fn from_vars(
        endpoint: Endpoint,
        breaker: Breaker,
        vars: impl Fn(&str) -> Option<String>,
    ) -> Result<Self> {
        let value = vars(&endpoint.secret_env).ok_or(std::env::VarError::NotPresent);
        Self::with_secret_var(endpoint, breaker, value)
    }

    fn with_secret_var(
        endpoint: Endpoint,
        breaker: Breaker,
        value: Result<String, std::env::VarError>,
    ) -> Result<Self> {
        let text = match value {
            Ok(text) => text,
            Err(std::env::VarError::NotPresent) => {
                return Err(Error::MissingSecret {
                    endpoint: endpoint.name,
                    var: endpoint.secret_env,
                });
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(Error::InvalidSecret {
                    endpoint: endpoint.name,
                    var: endpoint.secret_env,
                    reason: "it is not valid UTF-8".into(),
                });
            }
        };
        let secret = Secret::parse(&text).map_err(|e| Error::InvalidSecret {
            endpoint: endpoint.name.clone(),
            var: endpoint.secret_env.clone(),
            reason: e.to_string(),
        })?;
        Self::new(endpoint, secret, breaker)
    }

    /// The endpoint's name.
    pub fn name(&self) -> &str {
        &self.endpoint.name
    }

    /// The endpoint's configuration.
    pub fn config(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The parsed URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The endpoint's circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

/// Resolves every endpoint of `config` with [`resolve_endpoints_with`] and secrets from the
/// environment ([`ResolvedEndpoint::from_env`]).
pub fn resolve_endpoints(
    config: &ExecutorConfig,
    destinations: &Destinations,
) -> Result<Vec<ResolvedEndpoint>> {
    resolve_endpoints_with(config, destinations, ResolvedEndpoint::from_env)
}

/// Resolves every endpoint of `config`: URL, secret (by `resolve`), breaker settings,
/// and the destination policy for what can be checked before DNS. Returns every problem at
/// once (a startup error), not just the first.
pub fn resolve_endpoints_with(
    config: &ExecutorConfig,
    destinations: &Destinations,
    resolve: impl Fn(Endpoint, Breaker) -> Result<ResolvedEndpoint>,
) -> Result<Vec<ResolvedEndpoint>> {
    let mut endpoints = Vec::new();
    let mut problems = Vec::new();
    for (i, endpoint) in config.endpoints.iter().enumerate() {
        if config.endpoints[..i]
            .iter()
            .any(|e| e.name == endpoint.name)
        {
            problems.push(Error::DuplicateEndpoint(endpoint.name.clone()));
            continue;
        }
        let breaker = Breaker::new(config.breaker_failures, config.breaker_cooldown);
        match resolve(endpoint.clone(), breaker) {
            Ok(resolved) => match destinations.check_url(&resolved.url) {
                Ok(()) => endpoints.push(resolved),
                Err(refusal) => problems.push(Error::Destination {
                    endpoint: endpoint.name.clone(),
                    refusal,
                }),
            },
            Err(e) => problems.push(e),
        }
    }
    match problems.len() {
        0 => Ok(endpoints),
        1 => Err(problems.remove(0)),
        _ => Err(Error::Many(problems)),
    }
}

/// The outcome class of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The receiver answered 2xx.
    Delivered,
    /// The request failed; `retryable` says whether the retry schedule applies (see the
    /// module documentation).
    Failed {
        /// Whether to retry after [`backoff`]; if not, the action goes to the DLQ.
        retryable: bool,
    },
    /// The destination policy refused the request. Not retried.
    Refused(Refusal),
    /// The endpoint's breaker is open: no request was sent. Try again at `until`.
    ShortCircuited {
        /// When the breaker admits a probe at the earliest.
        until: Instant,
    },
}

impl Status {
    /// A short fixed label for metrics and the ledger.
    pub fn label(&self) -> &'static str {
        match self {
            Status::Delivered => "delivered",
            Status::Failed { retryable: true } => "failed_retryable",
            Status::Failed { retryable: false } => "failed",
            Status::Refused(_) => "refused",
            Status::ShortCircuited { .. } => "short_circuited",
        }
    }
}

/// One delivery attempt, as the action ledger records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The outcome class.
    pub status: Status,
    /// The HTTP status of the final answer, if one came.
    pub http_code: Option<u16>,
    /// Time from sending to the end of the answer (zero when nothing was sent).
    pub latency: Duration,
    /// What went wrong, for humans; `None` when delivered.
    pub error: Option<String>,
}

impl Attempt {
    fn unsent(status: Status, error: String) -> Attempt {
        Attempt {
            status,
            http_code: None,
            latency: Duration::ZERO,
            error: Some(error),
        }
    }
}

/// Sends signed webhooks through one shared HTTP client that enforces the destination policy.
#[derive(Debug, Clone)]
pub struct Deliverer {
    client: reqwest::Client,
    destinations: Arc<Destinations>,
}

impl Deliverer {
    /// A deliverer enforcing `destinations`.
    pub fn new(destinations: Destinations) -> Result<Self> {
        let destinations = Arc::new(destinations);
        let client = reqwest::Client::builder()
            .tls_backend_native()
            // Webhooks are small, independent POSTs: HTTP/1.1 with a keep-alive pool.
            .http1_only()
            .pool_idle_timeout(Duration::from_secs(90))
            // A proxy would resolve names itself, out of reach of the guarded resolver.
            .no_proxy()
            .dns_resolver(GuardedResolver::new(destinations.clone()))
            .redirect(redirect_policy(destinations.clone()))
            // One attempt is one request in the ledger; retries are the executor's schedule.
            .retry(reqwest::retry::never())
            .referer(false)
            .user_agent(concat!("sluice-executor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::Client)?;
        Ok(Deliverer {
            client,
            destinations,
        })
    }

    /// A deliverer with the policy of an executor's configuration.
    pub fn from_config(config: &ExecutorConfig) -> Result<Self> {
        let destinations = Destinations::from_config(config)
            .map_err(|bad| Error::Many(bad.into_iter().map(Error::AllowHosts).collect()))?;
        Deliverer::new(destinations)
    }

    /// The destination policy.
    pub fn destinations(&self) -> &Destinations {
        &self.destinations
    }

    /// Delivers `body` (JSON) as message `id` to `endpoint`, once.
    pub async fn attempt(&self, endpoint: &ResolvedEndpoint, id: &str, body: &[u8]) -> Attempt {
        self.attempt_at(Instant::now(), endpoint, id, body).await
    }

    /// [`Deliverer::attempt`] with the breaker's clock at `now` (the outcome is recorded at
    /// `now` plus the real latency), so tests can step over a cooldown without sleeping.
    pub async fn attempt_at(
        &self,
        now: Instant,
        endpoint: &ResolvedEndpoint,
        id: &str,
        body: &[u8],
    ) -> Attempt {
        if let Err(refusal) = self.destinations.check_url(&endpoint.url) {
            let error = refusal.to_string();
            return Attempt::unsent(Status::Refused(refusal), error);
        }
        // The breaker first: a short-circuited delivery costs no signing.
        if let Admit::ShortCircuit { until } = endpoint.breaker.admit(now) {
            let error = format!(
                "circuit breaker of endpoint `{}` is open for {:.0?} more",
                endpoint.name(),
                until.saturating_duration_since(now)
            );
            return Attempt::unsent(Status::ShortCircuited { until }, error);
        }
        let headers = match signed_headers(&endpoint.secret, id, body) {
            Ok(headers) => headers,
            Err(error) => return Attempt::unsent(Status::Failed { retryable: false }, error),
        };

        let timeout = endpoint.endpoint.timeout;
        let started = Instant::now();
        let sent = self
            .client
            .post(endpoint.url.clone())
            .timeout(timeout)
            .headers(headers)
            .body(body.to_vec())
            .send()
            .await;
        let (status, http_code, error) = match sent {
            Ok(response) => {
                let code = response.status();
                let body = read_body(response).await;
                classify_answer(code, &body)
            }
            Err(e) => classify_error(&e, timeout),
        };
        let latency = started.elapsed();
        endpoint
            .breaker
            .record(now + latency, status == Status::Delivered);
        tracing::debug!(
            endpoint = endpoint.name(),
            id,
            status = status.label(),
            http_code,
            ?latency,
            error = error.as_deref(),
            "delivery attempt"
        );
        Attempt {
            status,
            http_code,
            latency,
            error,
        }
    }
}

/// The wait before the next attempt after `failed_attempts` attempts have failed: `Some(0)`
/// for none (send now), `retry_backoff[n - 1]` after `n`, and `None` once the schedule is
/// used up, when the action goes to the DLQ.
pub fn backoff(retry_backoff: &[Duration], failed_attempts: u32) -> Option<Duration> {
    match failed_attempts {
        0 => Some(Duration::ZERO),
        n => retry_backoff.get(n as usize - 1).copied(),
    }
}

fn signed_headers(
    secret: &Secret,
    id: &str,
    body: &[u8],
) -> std::result::Result<HeaderMap, String> {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in sign(secret, id, timestamp, body).pairs() {
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("message id {id:?} cannot be sent as a header value"))?;
        headers.insert(HeaderName::from_static(name), value);
    }
    Ok(headers)
}

async fn read_body(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < MAX_BODY_READ {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            // The status decides the outcome; a body cut short only loses the quote.
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// Whether a non-2xx answer is worth retrying (see the module documentation).
pub fn retryable_status(code: StatusCode) -> bool {
    !code.is_client_error()
        || matches!(
            code,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
        )
}

fn classify_answer(code: StatusCode, body: &[u8]) -> (Status, Option<u16>, Option<String>) {
    if code.is_success() {
        return (Status::Delivered, Some(code.as_u16()), None);
    }
    let quote: String = String::from_utf8_lossy(body)
        .chars()
        .take(MAX_QUOTE)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let quote = quote.trim();
    let error = if quote.is_empty() {
        format!("HTTP {code}")
    } else {
        format!("HTTP {code}: {quote}")
    };
    let status = Status::Failed {
        retryable: retryable_status(code),
    };
    (status, Some(code.as_u16()), Some(error))
}

fn classify_error(e: &reqwest::Error, timeout: Duration) -> (Status, Option<u16>, Option<String>) {
    let mut source: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(refusal) = err.downcast_ref::<Refusal>() {
            return (
                Status::Refused(refusal.clone()),
                None,
                Some(refusal.to_string()),
            );
        }
        source = err.source();
    }
    let error = if e.is_timeout() {
        format!("timed out after {timeout:?}")
    } else {
        ErrorChain(e).to_string()
    };
    (Status::Failed { retryable: true }, None, Some(error))
}

/// An error and its sources, `: `-separated, skipping a source whose text its parent already
/// shows.
struct ErrorChain<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            let text = err.to_string();
            if !last.contains(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_schedule_then_gives_up() {
        let schedule: Vec<Duration> = [1, 2, 4, 8, 16].map(Duration::from_secs).to_vec();
        assert_eq!(backoff(&schedule, 0), Some(Duration::ZERO));
        assert_eq!(backoff(&schedule, 1), Some(Duration::from_secs(1)));
        assert_eq!(backoff(&schedule, 3), Some(Duration::from_secs(4)));
        assert_eq!(backoff(&schedule, 5), Some(Duration::from_secs(16)));
        assert_eq!(backoff(&schedule, 6), None);
        assert_eq!(backoff(&schedule, u32::MAX), None);
        assert_eq!(backoff(&[], 1), None);
    }

    #[test]
    fn answers_are_classified() {
        let ok = classify_answer(StatusCode::NO_CONTENT, b"");
        assert_eq!(ok, (Status::Delivered, Some(204), None));
        for (code, retryable) in [
            (404, false),
            (400, false),
            (401, false),
            (410, false),
            (408, true),
            (425, true),
            (429, true),
            (500, true),
            (503, true),
            (302, true),
        ] {
            let code = StatusCode::from_u16(code).unwrap();
            let (status, http, _) = classify_answer(code, b"");
            assert_eq!(status, Status::Failed { retryable }, "{code}");
            assert_eq!(http, Some(code.as_u16()));
        }
        let (_, _, error) = classify_answer(StatusCode::BAD_REQUEST, b"bad\nfield `x`\r\n");
        assert_eq!(
            error.as_deref(),
            Some("HTTP 400 Bad Request: bad field `x`")
        );
        let long = vec![b'a'; 1000];
        let (_, _, error) = classify_answer(StatusCode::BAD_GATEWAY, &long);
        assert_eq!(
            error.unwrap().len(),
            "HTTP 502 Bad Gateway: ".len() + MAX_QUOTE
        );
    }

    #[test]
    fn secrets_come_from_the_named_variable() {
        let endpoint = Endpoint {
            name: "ops".into(),
            url: "https://hooks.example.com/x".into(),
            secret_env: "SLUICE_TEST_OPS_SECRET".into(),
            timeout: Duration::from_secs(30),
        };
        let e = ResolvedEndpoint::from_vars(endpoint.clone(), Breaker::default(), |_| None)
            .unwrap_err();
        assert!(matches!(e, Error::MissingSecret { .. }));
        assert!(e.to_string().contains("`SLUICE_TEST_OPS_SECRET`"), "{e}");

        let leaked = "whsec_c2hvcnQ=";
        let e = ResolvedEndpoint::from_vars(endpoint.clone(), Breaker::default(), |_| {
            Some(leaked.into())
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`SLUICE_TEST_OPS_SECRET`") && msg.contains("5 bytes"),
            "{msg}"
        );
        assert!(!msg.contains("c2hvcnQ"), "{msg}");

        let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let ok = ResolvedEndpoint::from_vars(endpoint.clone(), Breaker::default(), |var| {
            (var == "SLUICE_TEST_OPS_SECRET").then(|| good.into())
        })
        .unwrap();
        assert_eq!(ok.name(), "ops");
        assert!(!format!("{ok:?}").contains("MfKQ"));

        // The real environment: a variable that is surely unset.
        let mut unset = endpoint;
        unset.secret_env = "SLUICE_EXECUTOR_TEST_SURELY_UNSET_7f3a".into();
        let e = ResolvedEndpoint::from_env(unset, Breaker::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("SLUICE_EXECUTOR_TEST_SURELY_UNSET_7f3a")
        );
    }

    #[test]
    fn resolve_endpoints_reports_every_problem() {
        let endpoint = |name: &str, url: &str, var: &str| Endpoint {
            name: name.into(),
            url: url.into(),
            secret_env: var.into(),
            timeout: Duration::from_secs(1),
        };
        let config = ExecutorConfig {
            endpoints: vec![
                endpoint(
                    "a",
                    "https://hooks.example.com/",
                    "SLUICE_EXECUTOR_TEST_UNSET_A",
                ),
                endpoint("b", "http://127.0.0.1/", "PATH"),
                endpoint("a", "https://x.example.com/", "PATH"),
            ],
            ..ExecutorConfig::default()
        };
        let destinations = Destinations::from_config(&config).unwrap();
        let Err(Error::Many(problems)) = resolve_endpoints(&config, &destinations) else {
            panic!("expected several problems");
        };
        let text: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{text:#?}");
        assert!(
            text[0].contains("SLUICE_EXECUTOR_TEST_UNSET_A"),
            "{}",
            text[0]
        );
        // PATH is set but is no whsec_ secret.
        assert!(
            text[1].contains("`PATH`") && text[1].contains("whsec_"),
            "{}",
            text[1]
        );
        assert!(
            text[2].contains("`a`") && text[2].contains("more than once"),
            "{}",
            text[2]
        );
    }
}
