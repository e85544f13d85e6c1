//! The HTTP transport: batches of events posted to `/v1/events` with a few requests in flight,
//! retrying 429 (after `Retry-After`), 503 and connection errors, stopping on 401/403.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::encode::write_http;
use crate::fleet::SimEvent;
use crate::pace::{Pacer, TICK};
use crate::{Counters, Ctx, DRAIN_TIMEOUT, Health, Outcome, backoff};

/// Requests in flight at once.
const CONCURRENCY: usize = 6;
/// A batch not full after this long is sent anyway, so a low rate still flows.
const LINGER: Duration = Duration::from_millis(250);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at a batch answered with a 5xx other than 503 (likely a bug, not an outage).
const MAX_SERVER_ERROR_ATTEMPTS: u32 = 5;
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Rejections of well-formed events logged as warnings; the rest only at debug.
const WARN_REJECTIONS: u64 = 10;

/// What the request tasks share.
struct Shared {
    client: reqwest::Client,
    endpoint: String,
    auth: HeaderValue,
    counters: Arc<Counters>,
    health: Arc<Health>,
    sending: CancellationToken,
    /// Cancelled when the drain is over: requests still retrying give up and count as failed.
    abandon: CancellationToken,
    unexpected_rejections: AtomicU64,
}

/// A request body: a JSON array being written.
#[derive(Debug, Default)]
struct Batch {
    buf: Vec<u8>,
    len: u64,
    opened: Option<Instant>,
    /// Indices of the malformed elements, whose rejection is expected.
    malformed: Vec<u32>,
    /// Copies of duplicated elements, for the next batch (as a client retry would resend).
    carry: Vec<(Vec<u8>, bool)>,
}

/// A closed batch on its way.
struct Body {
    bytes: Vec<u8>,
    len: u64,
    malformed: Vec<u32>,
}

impl Batch {
    fn push(&mut self, event: &SimEvent) {
        let start = self.open();
        write_http(event, &mut self.buf);
        if event.malformed.is_some() {
            self.malformed.push(self.len as u32);
        }
        if event.duplicate {
            let copy = self.buf[start..].to_vec();
            self.carry.push((copy, event.malformed.is_some()));
        }
        self.len += 1;
    }

    /// Starts an element; returns where it begins.
    fn open(&mut self) -> usize {
        if self.len == 0 {
            self.buf.clear();
            self.buf.push(b'[');
            self.opened = Some(Instant::now());
        } else {
            self.buf.push(b',');
        }
        self.buf.len()
    }

    fn age(&self) -> Duration {
        self.opened.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Closes the batch, and starts the next with the copies carried over (counted as sent).
    fn take(&mut self, counters: &Counters) -> Option<Body> {
        if self.len == 0 {
            return None;
        }
        self.buf.push(b']');
        let capacity = self.buf.capacity();
        let body = Body {
            bytes: std::mem::replace(&mut self.buf, Vec::with_capacity(capacity)),
            len: std::mem::take(&mut self.len),
            malformed: std::mem::take(&mut self.malformed),
        };
        for (copy, malformed) in std::mem::take(&mut self.carry) {
            self.open();
            self.buf.extend_from_slice(&copy);
            if malformed {
                self.malformed.push(self.len as u32);
            }
            self.len += 1;
            Counters::add(&counters.sent, 1);
            Counters::add(&counters.duplicates_sent, 1);
        }
        Some(body)
    }
}

pub(crate) async fn run(mut ctx: Ctx, url: &str, key: &str, batch_size: usize) -> Result<Outcome> {
    let endpoint = endpoint(url)?;
    if batch_size == 0 {
        bail!("batch must be at least 1 event");
    }
    let mut auth = HeaderValue::from_str(&format!("Bearer {key}"))
        .context("the API key has characters an HTTP header cannot carry")?;
    auth.set_sensitive(true);
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .context("cannot build the HTTP client")?;
    let shared = Arc::new(Shared {
        client,
        endpoint,
        auth,
        counters: ctx.counters.clone(),
        health: ctx.health.clone(),
        sending: ctx.sending.clone(),
        abandon: CancellationToken::new(),
        unexpected_rejections: AtomicU64::new(0),
    });
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    let mut batch = Batch::default();
    // A closed batch still waiting for a request slot.
    let mut ready: Option<Body> = None;

    let start = Instant::now();
    let mut pacer = Pacer::new(ctx.rate, start);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    'run: loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = ctx.sending.cancelled() => break,
        }
        while tasks.try_join_next().is_some() {}
        for _ in 0..pacer.due(Instant::now()) {
            let event = ctx.emitter.next();
            batch.push(&event);
            Counters::add(&ctx.counters.sent, 1);
            ctx.emitter.sent(&event);
            pacer.sent(1);
            if batch.len as usize >= batch_size {
                ready = batch.take(&ctx.counters);
                if !dispatch(&mut ready, &permits, &mut tasks, &shared, &ctx.sending).await {
                    break 'run;
                }
            }
        }
        if batch.age() >= LINGER {
            ready = batch.take(&ctx.counters);
            if !dispatch(&mut ready, &permits, &mut tasks, &shared, &ctx.sending).await {
                break 'run;
            }
        }
    }
    let sending_time = start.elapsed();
    ctx.sending.cancel();
    let stopped_early = ctx.stopped_early();

    // Drain: what is open or in flight gets until the deadline, or nothing when the target is
    // unreachable or refused us.
    let abandon = shared.abandon.clone();
    if stopped_early.is_some() {
        abandon.cancel();
    }
    let timer = tokio::spawn({
        let abandon = abandon.clone();
        async move {
            tokio::select! {
                () = tokio::time::sleep(DRAIN_TIMEOUT) => abandon.cancel(),
                () = abandon.cancelled() => {}
            }
        }
    });
    // The batch that was waiting, the open one, then the copies it carried.
    let mut leftovers = vec![ready.take()];
    leftovers.push(batch.take(&ctx.counters));
    leftovers.push(batch.take(&ctx.counters));
    for body in leftovers {
        let mut body = body;
        if !dispatch(&mut body, &permits, &mut tasks, &shared, &abandon).await
            && let Some(body) = body
        {
            Counters::add(&ctx.counters.failed, body.len);
        }
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!("an HTTP request task failed: {e}");
        }
    }
    abandon.cancel();
    let _ = timer.await;
    Ok(ctx.finish(sending_time))
}

/// `POST` address of the ingest API at `url`.
pub(crate) fn endpoint(url: &str) -> Result<String> {
    let base = url.trim_end_matches('/');
    match base.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() => Ok(format!("{base}/v1/events")),
        _ => bail!(
            "{} is not an ingest API URL: expected http://host:port (https is not supported in this build)",
            crate::scheme(url)
        ),
    }
}

/// Starts a request for the batch in `ready` once a slot is free; false (and the batch left in
/// `ready`) when `until` fires first.
async fn dispatch(
    ready: &mut Option<Body>,
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    shared: &Arc<Shared>,
    until: &CancellationToken,
) -> bool {
    let Some(body) = ready.take() else {
        return true;
    };
    let permit = tokio::select! {
        permit = permits.clone().acquire_owned() => permit,
        () = until.cancelled() => {
            *ready = Some(body);
            return false;
        }
    };
    let Ok(permit) = permit else {
        // The semaphore is never closed; treat it as gone all the same.
        *ready = Some(body);
        return false;
    };
    tasks.spawn(deliver(shared.clone(), body, permit));
    true
}

#[derive(Deserialize)]
struct PartialAnswer {
    #[serde(default)]
    accepted: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    rejected: Vec<Rejection>,
}

#[derive(Deserialize)]
struct Rejection {
    index: u32,
    #[serde(default)]
    reason: String,
}

/// Posts one batch until it has an answer that settles it, counting each of its events.
async fn deliver(s: Arc<Shared>, body: Body, _permit: OwnedSemaphorePermit) {
    let c = &s.counters;
    let n = body.len;
    let mut attempt = 0u32;
    loop {
        let request = s
            .client
            .post(&s.endpoint)
            .header(AUTHORIZATION, s.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.bytes.clone())
            .send();
        let response = tokio::select! {
            r = request => r,
            () = s.abandon.cancelled() => {
                Counters::add(&c.failed, n);
                return;
            }
        };
        let wait = match response {
            Err(e) => {
                s.health.failure(format!("{}: {}", s.endpoint, chain(&e)));
                backoff(attempt)
            }
            Ok(response) => {
                let status = response.status();
                match status {
                    _ if status.is_success() => {
                        s.health.ok();
                        Counters::add(&c.acknowledged, n);
                        return;
                    }
                    StatusCode::BAD_REQUEST => {
                        s.health.ok();
                        settle_partial(&s, &body, response).await;
                        return;
                    }
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        let reason = format!("{} refused the API key: {status}", s.endpoint);
                        s.health.note(reason.clone());
                        s.health.set_fatal(reason);
                        s.sending.cancel();
                        Counters::add(&c.failed, n);
                        return;
                    }
                    StatusCode::TOO_MANY_REQUESTS => {
                        s.health.note(format!("{} answered {status}", s.endpoint));
                        retry_after(&response)
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        s.health.note(format!("{} answered {status}", s.endpoint));
                        backoff(attempt)
                    }
                    _ if status.is_server_error() => {
                        s.health.note(format!("{} answered {status}", s.endpoint));
                        if attempt + 1 >= MAX_SERVER_ERROR_ATTEMPTS {
                            tracing::warn!(
                                "{} answered {status} {} times; {n} events lost",
                                s.endpoint,
                                attempt + 1
                            );
                            Counters::add(&c.failed, n);
                            return;
                        }
                        backoff(attempt)
                    }
                    _ => {
                        // Any other refusal (413, 415 ...) settles the whole batch.
                        s.health.note(format!("{} answered {status}", s.endpoint));
                        tracing::warn!("{} answered {status}; {n} events rejected", s.endpoint);
                        Counters::add(&c.rejected, n);
                        return;
                    }
                }
            }
        };
        attempt += 1;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = s.abandon.cancelled() => {
                Counters::add(&c.failed, n);
                return;
            }
        }
    }
}

/// A 400: the valid events were accepted and the rest rejected.
async fn settle_partial(s: &Shared, body: &Body, response: reqwest::Response) {
    let c = &s.counters;
    let n = body.len;
    let answer = match response.bytes().await {
        Ok(bytes) => serde_json::from_slice::<PartialAnswer>(&bytes).ok(),
        Err(_) => None,
    };
    let Some(answer) = answer else {
        tracing::warn!(
            "{} answered 400 without a readable body; {n} events rejected",
            s.endpoint
        );
        Counters::add(&c.rejected, n);
        return;
    };
    let accepted = (answer.accepted.len() as u64).min(n);
    Counters::add(&c.acknowledged, accepted);
    Counters::add(&c.rejected, n - accepted);
    for r in &answer.rejected {
        if body.malformed.contains(&r.index) {
            tracing::debug!(
                "malformed event {} rejected as expected: {}",
                r.index,
                r.reason
            );
        } else if s.unexpected_rejections.fetch_add(1, Ordering::Relaxed) < WARN_REJECTIONS {
            tracing::warn!("a well-formed event was rejected: {}", r.reason);
        }
    }
}

/// `Retry-After` in seconds (the form Sluice sends); 1 s when absent or a date.
fn retry_after(response: &reqwest::Response) -> Duration {
    response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(1), Duration::from_secs_f64)
        .min(MAX_RETRY_AFTER)
}

/// An error and its causes on one line (reqwest's own message leaves out the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FleetConfig;
    use crate::fleet::{Fleet, Malformation};

    #[test]
    fn a_batch_is_a_json_array_and_duplicates_go_in_the_next() {
        let mut fleet = Fleet::new(FleetConfig::default());
        let counters = Counters::default();
        let mut batch = Batch::default();
        let mut events = Vec::new();
        for i in 0..3 {
            let mut e = fleet.next_event(chrono::Utc::now());
            e.duplicate = i == 1;
            e.malformed = (i == 2).then_some(Malformation::MissingField("payload"));
            batch.push(&e);
            events.push(e);
        }
        let body = batch.take(&counters).unwrap();
        let doc: Vec<serde_json::Value> = serde_json::from_slice(&body.bytes).unwrap();
        assert_eq!(doc.len(), 3);
        assert_eq!(body.len, 3);
        assert_eq!(body.malformed, [2]);
        assert_eq!(doc[1]["event_id"], events[1].event_id.to_string());
        // The copy opens the next batch, byte for byte.
        let next = batch.take(&counters).unwrap();
        let doc_next: Vec<serde_json::Value> = serde_json::from_slice(&next.bytes).unwrap();
        assert_eq!(doc_next, [doc[1].clone()]);
        assert!(next.malformed.is_empty());
        assert_eq!(Counters::get(&counters.duplicates_sent), 1);
        assert!(batch.take(&counters).is_none());
    }
}
