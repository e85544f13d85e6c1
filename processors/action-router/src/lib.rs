//! The action router: turns findings (inference results, status changes, any event) into
//! `action.requested` events by the rules of its topology.
//!
//! A rule matches an event type and a predicate over the event's fields
//! ([`sluice_rules`]); when it holds, the rule requests its action from the executor, at most
//! once per device within the rule's dedup window and within its rate limit. A destructive
//! action is requested as denied unless the rule allows it (deny by default), so the denial
//! is recorded in the action ledger instead of vanishing. A replayed event's actions are
//! requested as suppressed. Action ids derive from the event id, the rule id and version and
//! the endpoint, so a retry or a replay requests the same action and the executor delivers
//! it once.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};
use sluice_core::{Event, EventType, Source};
use sluice_runtime::{Outputs, ProcessError, Processor};

pub use sluice_topology::{ActionRouterConfig, Rule};

/// The processor's name in topologies and metrics.
pub const NAME: &str = "action-router";

/// The output port.
pub const PORT: &str = "requested";

/// Why a router cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rule's predicate or limit is wrong (the topology check reports the same).
    #[error("rule {rule}: {message}")]
    Rule {
        /// The rule id.
        rule: String,
        /// What is wrong.
        message: String,
    },
}

/// What the router has done, for progress lines and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Actions requested (denied and suppressed ones included).
    pub requested: AtomicU64,
    /// Of those, destructive actions requested as denied.
    pub denied: AtomicU64,
    /// Of those, requested as suppressed (the event was replayed).
    pub suppressed: AtomicU64,
    /// Matches dropped because the rule fired for the device within its dedup window.
    pub deduplicated: AtomicU64,
    /// Matches dropped by the rule's rate limit.
    pub rate_limited: AtomicU64,
    /// Predicates that could not be evaluated (e.g. a division by zero): no match.
    pub eval_errors: AtomicU64,
}

struct CompiledRule {
    rule: Rule,
    event_type: String,
    predicate: sluice_rules::Expr,
    /// Device → the event that last fired the rule for it, for the dedup window. Keeping the
    /// event id lets a retry of that same event fire again (same action id, delivered once).
    fired: moka::sync::Cache<String, uuid::Uuid>,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for CompiledRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRule")
            .field("id", &self.rule.id)
            .field("version", &self.rule.version)
            .finish_non_exhaustive()
    }
}

/// The action-router processor.
#[derive(Debug)]
pub struct Router {
    name: String,
    rules: Vec<CompiledRule>,
    stats: Arc<Stats>,
}

impl Router {
    /// A router for `config`'s rules, in order.
    pub fn new(name: &str, config: &ActionRouterConfig) -> Result<Router, Error> {
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                let err = |message: String| Error::Rule {
                    rule: rule.id.clone(),
                    message,
                };
                let predicate = sluice_rules::parse(&rule.when).map_err(|e| err(e.to_string()))?;
                let limiter = rule
                    .rate_limit
                    .as_deref()
                    .map(|l| {
                        quota(l)
                            .map(RateLimiter::direct)
                            .ok_or_else(|| err(format!("rate limit {l:?} is not <count>/<s|m|h>")))
                    })
                    .transpose()?;
                Ok(CompiledRule {
                    event_type: rule.match_type.clone(),
                    predicate,
                    fired: moka::sync::Cache::builder()
                        .max_capacity(1_000_000)
                        .time_to_live(rule.dedup_window.max(Duration::from_millis(1)))
                        .build(),
                    limiter,
                    rule: rule.clone(),
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Router {
            name: name.to_owned(),
            rules,
            stats: Arc::new(Stats::default()),
        })
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// How many rules it has.
    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    /// The actions `event` requests, in rule order.
    pub fn route(&self, event: &Event) -> Result<Vec<Event>, ProcessError> {
        let mut actions = Vec::new();
        let mut view: Option<Value> = None;
        let suppressed = event.metadata.source == Source::Replay
            || event
                .metadata
                .replay
                .as_ref()
                .is_some_and(|r| !r.fire_actions);
        for rule in &self.rules {
            if rule.event_type != event.event_type.as_str() {
                continue;
            }
            let view = view.get_or_insert_with(|| event_view(event));
            match sluice_rules::eval(&rule.predicate, view) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    self.stats.eval_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(rule = %rule.rule.id, event_id = %event.event_id, error = %e, "predicate not evaluated; no match");
                    continue;
                }
            }
            // A suppressed replay is recorded, but must not use up the window or the limit
            // that live events of the device need.
            if suppressed {
                actions.push(self.request(rule, event, view, true)?);
                continue;
            }
            let device = &event.aggregate_id;
            let last = rule.fired.get(device);
            if last.is_some_and(|last| last != event.event_id) {
                self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // A retry of the event that fired already counted against the limit.
            if let Some(limiter) = &rule.limiter
                && last.is_none()
                && limiter.check().is_err()
            {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            rule.fired.insert(device.clone(), event.event_id);
            actions.push(self.request(rule, event, view, false)?);
        }
        Ok(actions)
    }

    fn request(
        &self,
        c: &CompiledRule,
        event: &Event,
        view: &Value,
        suppressed: bool,
    ) -> Result<Event, ProcessError> {
        let rule = &c.rule;
        let body = match &rule.action.template {
            Some(template) => render(template, view).map_err(|detail| ProcessError::Rejected {
                reason: "template",
                detail: format!("rule {}: {detail}", rule.id),
            })?,
            None => json!({
                "rule": {"id": rule.id, "version": rule.version},
                "event": view,
            })
            .to_string(),
        };
        let denied = rule.destructive && !rule.allow_destructive;
        self.stats.requested.fetch_add(1, Ordering::Relaxed);
        if denied {
            self.stats.denied.fetch_add(1, Ordering::Relaxed);
        }
        if suppressed {
            self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        let payload = json!({
            "input_event_id": event.event_id.to_string(),
            "rule_id": rule.id,
            "rule_version": rule.version,
            "endpoint": rule.action.endpoint,
            "destructive": rule.destructive,
            "denied": denied,
            "body": body,
            "suppressed": suppressed,
        });
        Ok(event.derive(
            &format!(
                "action/{}@{}/{}",
                rule.id, rule.version, rule.action.endpoint
            ),
            EventType::new(EventType::ACTION_REQUESTED).expect("a valid event type"),
            payload,
            Source::Processor(self.name.clone()),
            Utc::now(),
        ))
    }
}

/// The event as rules and templates see it: the envelope's fields, `device` for the
/// aggregate, and the payload (its fields also by their bare names, in the evaluator).
fn event_view(event: &Event) -> Value {
    json!({
        "event_id": event.event_id.to_string(),
        "event_type": event.event_type.as_str(),
        "aggregate_id": event.aggregate_id,
        "device": event.aggregate_id,
        "occurred_at": event.occurred_at.to_rfc3339(),
        "payload": event.payload,
    })
}

/// `template` with each `{{path}}` replaced by the field's value: inside a JSON string the
/// value's text is escaped into it, elsewhere its JSON. The result must be JSON.
pub fn render(template: &str, view: &Value) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let (before, after) = rest.split_at(start);
        out.push_str(before);
        let end = after.find("}}").ok_or_else(|| {
            format!(
                "unclosed {{{{ in template at byte {}",
                template.len() - rest.len() + start
            )
        })?;
        let path = after[2..end].trim();
        let value = lookup(view, path).unwrap_or(&Value::Null);
        // Inside a JSON string when an odd number of unescaped quotes precede.
        let in_string = quotes_open(&out);
        match (in_string, value) {
            (true, Value::String(s)) => out.push_str(&escape(s)),
            (true, other) => out.push_str(&escape(&other.to_string())),
            (false, other) => out.push_str(&other.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    serde_json::from_str::<Value>(&out)
        .map_err(|e| format!("the rendered body is not JSON ({e}): {out}"))?;
    Ok(out)
}

fn lookup<'a>(view: &'a Value, path: &str) -> Option<&'a Value> {
    let walk = |root: &'a Value| path.split('.').try_fold(root, |v, key| v.get(key));
    view.get("payload").and_then(walk).or_else(|| walk(view))
}

fn quotes_open(s: &str) -> bool {
    let mut open = false;
    let mut escaped = false;
    for c in s.chars() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => open = !open,
            _ => {}
        }
    }
    open
}

fn escape(s: &str) -> String {
    let quoted = Value::String(s.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

/// `<count>/<s|m|h>` as a quota.
fn quota(limit: &str) -> Option<Quota> {
    let (count, unit) = limit.split_once('/')?;
    let n = NonZeroU32::new(count.trim().parse().ok()?)?;
    Some(match unit.trim() {
        "s" => Quota::per_second(n),
        "m" => Quota::per_minute(n),
        "h" => Quota::per_hour(n),
        _ => return None,
    })
}

impl Processor for Router {
    const NAME: &'static str = NAME;

    async fn process(&self, event: Event, out: &mut Outputs) -> Result<(), ProcessError> {
        for action in self.route(&event)? {
            out.emit(PORT, action);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule as the default topology writes them.
    fn rule(id: &str, when: &str) -> Rule {
        serde_json::from_value(json!({
            "id": id,
            "match": "inference.result",
            "when": when,
            "action": {"endpoint": "ops-webhook"},
        }))
        .unwrap()
    }

    fn result(device: &str, score: f64, label: &str) -> Event {
        Event::new(
            EventType::new(EventType::INFERENCE_RESULT).unwrap(),
            device,
            Utc::now(),
            json!({"score": score, "label": label, "site": "plant-3", "model_name": "m"}),
            Source::Processor("inferencer".into()),
        )
        .unwrap()
    }

    fn router(rules: Vec<Rule>) -> Router {
        Router::new("router", &ActionRouterConfig { rules }).unwrap()
    }

    #[test]
    fn a_matching_rule_requests_its_action_with_a_deterministic_id() {
        let r = router(vec![rule("alert", r#"label == "anomaly" and score > 0.8"#)]);
        let hit = result("dev-1", 0.9, "anomaly");
        let actions = r.route(&hit).unwrap();
        assert_eq!(actions.len(), 1);
        let a = &actions[0];
        assert_eq!(a.event_type.as_str(), EventType::ACTION_REQUESTED);
        assert_eq!(a.payload["rule_id"], "alert");
        assert_eq!(a.payload["endpoint"], "ops-webhook");
        assert_eq!(a.payload["input_event_id"], hit.event_id.to_string());
        assert_eq!(a.payload["denied"], false);
        assert_eq!(
            a.event_id,
            sluice_core::derived_event_id(hit.event_id, "action/alert@1/ops-webhook")
        );
        // A retry of the same event requests the same action, dedup window or not.
        assert_eq!(r.route(&hit).unwrap()[0].event_id, a.event_id);
        assert!(
            r.route(&result("dev-2", 0.5, "anomaly"))
                .unwrap()
                .is_empty()
        );
        assert!(
            r.route(&result("dev-2", 0.95, "normal"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_dedup_window_keeps_one_action_per_rule_and_device() {
        let r = router(vec![rule("alert", "score > 0.8")]);
        assert_eq!(r.route(&result("dev-1", 0.9, "anomaly")).unwrap().len(), 1);
        assert!(
            r.route(&result("dev-1", 0.99, "anomaly"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(r.route(&result("dev-2", 0.9, "anomaly")).unwrap().len(), 1);
        assert_eq!(r.stats().deduplicated.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_rate_limit_caps_a_rule() {
        let mut limited = rule("alert", "score > 0.8");
        limited.rate_limit = Some("2/h".into());
        let r = router(vec![limited]);
        let fired: usize = (0..5)
            .map(|i| {
                r.route(&result(&format!("dev-{i}"), 0.9, "anomaly"))
                    .unwrap()
                    .len()
            })
            .sum();
        assert_eq!(fired, 2);
        assert_eq!(r.stats().rate_limited.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn destructive_actions_are_denied_unless_allowed_and_replays_are_suppressed() {
        let mut denied = rule("shutdown", "score > 0.8");
        denied.destructive = true;
        let mut allowed = rule("shutdown-allowed", "score > 0.8");
        allowed.destructive = true;
        allowed.allow_destructive = true;
        let r = router(vec![denied, allowed]);
        let actions = r.route(&result("dev-1", 0.9, "anomaly")).unwrap();
        assert_eq!(actions[0].payload["denied"], true);
        assert_eq!(actions[1].payload["denied"], false);
        let mut replayed = result("dev-9", 0.9, "anomaly");
        replayed.metadata.source = Source::Replay;
        for a in r.route(&replayed).unwrap() {
            assert_eq!(a.payload["suppressed"], true);
        }
        assert_eq!(r.stats().denied.load(Ordering::Relaxed), 2);
    }

    /// A replayed event (marked in its headers, inherited by what derives from it) requests
    /// suppressed actions without using up the device's dedup window; a job that fires
    /// actions gets ordinary requests, with the same derived ids as the first time.
    #[test]
    fn replay_marks_suppress_actions_unless_the_job_fires_them() {
        let r = router(vec![rule("alert", "score > 0.8")]);
        let live = result("dev-1", 0.9, "anomaly");
        let first = r.route(&live).unwrap();
        assert_eq!(first[0].payload["suppressed"], false);

        let mark = |fire_actions| sluice_core::Replay {
            job_id: "job-1".into(),
            fire_actions,
            rescore: false,
        };
        let mut replayed = result("dev-2", 0.95, "anomaly");
        replayed.metadata.replay = Some(mark(false));
        let suppressed = r.route(&replayed).unwrap();
        assert_eq!(suppressed.len(), 1);
        assert_eq!(suppressed[0].payload["suppressed"], true);
        // dev-2's window is untouched: its next live anomaly fires.
        let next = r.route(&result("dev-2", 0.97, "anomaly")).unwrap();
        assert_eq!(next[0].payload["suppressed"], false);

        let mut again = live.clone();
        again.metadata.replay = Some(mark(true));
        let fired = r.route(&again).unwrap();
        assert_eq!(fired[0].payload["suppressed"], false);
        assert_eq!(
            fired[0].event_id, first[0].event_id,
            "the executor dedupes on it"
        );
    }

    #[test]
    fn templates_render_fields_escaped_into_json() {
        let view = json!({"device": "dev-\"1\"", "payload": {"score": 0.93, "site": "plant-3"}});
        let body = render(
            r#"{"text": "Anomaly on {{device}} at {{site}}: {{score}}", "score": {{score}}}"#,
            &view,
        )
        .unwrap();
        let parsed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["text"], "Anomaly on dev-\"1\" at plant-3: 0.93");
        assert_eq!(parsed["score"], 0.93);
        assert!(render(r#"{"x": {{missing}}"#, &view).is_err(), "not JSON");
    }
}
