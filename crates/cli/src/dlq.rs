//! `sluice dlq`: list, show, re-drive and discard dead letters. A re-drive publishes the raw
//! record (value, key, headers) back to the topic it was consumed from, with a header naming
//! its first place so the validator derives the same event id however often it is re-driven,
//! and marks it replayed only after the log acknowledged it.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Result, bail};
use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use sluice_log::{Header, KafkaLog, Log, Producer, Record};
use sluice_store::{DlqEntry, DlqFilter, DlqStatus, EXECUTOR_PROCESSOR};

use crate::cli::{DlqCommand, DlqSelect};
use crate::commands::runtime;
use crate::ops::{Ops, open_embedded, parse_time, progress};

/// Dead letters re-published per produce call (and marked per store transaction).
const CHUNK: usize = 500;

pub fn dlq(cmd: &DlqCommand) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let target = match cmd {
            DlqCommand::List { target, .. }
            | DlqCommand::Show { target, .. }
            | DlqCommand::Replay { target, .. }
            | DlqCommand::Discard { target, .. } => target,
        };
        let ops = Ops::connect(target).await?;
        let result = match cmd {
            DlqCommand::List {
                select,
                status,
                limit,
                json,
                ..
            } => list(&ops, select, status.as_deref(), *limit, *json).await,
            DlqCommand::Show { id, json, .. } => show(&ops, *id, *json).await,
            DlqCommand::Replay {
                ids,
                select,
                dry_run,
                ..
            } => replay(&ops, ids, select, *dry_run).await,
            DlqCommand::Discard {
                ids,
                select,
                reason,
                dry_run,
                ..
            } => discard(&ops, ids, select, reason, *dry_run).await,
        };
        ops.store.close().await;
        result
    })
}

fn filter_of(select: &DlqSelect, status: Option<DlqStatus>) -> Result<DlqFilter> {
    let now = Utc::now();
    Ok(DlqFilter {
        processor: select.processor.clone(),
        error_class: select.error_class.clone(),
        status,
        since: select
            .since
            .as_deref()
            .map(|t| parse_time(t, now))
            .transpose()?,
        until: select
            .until
            .as_deref()
            .map(|t| parse_time(t, now))
            .transpose()?,
        ..DlqFilter::default()
    })
}

async fn list(
    ops: &Ops,
    select: &DlqSelect,
    status: Option<&str>,
    limit: u32,
    json: bool,
) -> Result<ExitCode> {
    let status = status
        .map(str::parse::<DlqStatus>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let filter = DlqFilter {
        limit,
        ..filter_of(select, status)?
    };
    let entries = ops.store.dlq_list(&filter).await?;
    if json {
        let rows: Vec<Value> = entries.iter().map(summary).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        println!("no dead letters match");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>6}  {:<20}  {:<16}  {:<16}  {:<9}  {:<26}  error",
        "id", "failed at", "processor", "class", "status", "source"
    );
    for e in &entries {
        let mut message = e.error_message.replace('\n', " ");
        if message.chars().count() > 60 {
            message = message.chars().take(59).collect::<String>() + "…";
        }
        println!(
            "{:>6}  {:<20}  {:<16}  {:<16}  {:<9}  {:<26}  {message}",
            e.dlq_id,
            e.failed_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            e.processor,
            e.error_class,
            e.status.as_str(),
            format!("{}:{}@{}", e.topic, e.partition, e.offset),
        );
    }
    if entries.len() as u32 == limit {
        eprintln!("(first {limit}; raise --limit or narrow the filters for more)");
    }
    Ok(ExitCode::SUCCESS)
}

/// An entry without its raw bytes (their length instead).
fn summary(e: &DlqEntry) -> Value {
    json!({
        "dlq_id": e.dlq_id,
        "processor": e.processor,
        "event_id": e.event_id,
        "topic": e.topic,
        "partition": e.partition,
        "offset": e.offset,
        "schema_id": e.schema_id,
        "raw_len": e.raw.len(),
        "error_class": e.error_class,
        "error_message": e.error_message,
        "failed_at": e.failed_at,
        "attempts": e.attempts,
        "status": e.status.as_str(),
        "status_changed_by": e.status_changed_by,
        "status_changed_at": e.status_changed_at,
        "reason": e.reason,
    })
}

async fn show(ops: &Ops, id: i64, json: bool) -> Result<ExitCode> {
    let Some(e) = ops.store.dlq_get(id).await? else {
        bail!("no dead letter {id}");
    };
    let history = ops
        .store
        .audit_log(Some(&format!("dlq:{id}")), 1000)
        .await?;
    let text = String::from_utf8_lossy(&e.raw);
    if json {
        let mut doc = summary(&e);
        doc["raw_hex"] = json!(hex::encode(&e.raw));
        doc["raw_text"] = json!(text);
        doc["decoded"] = e.decoded.clone().unwrap_or(Value::Null);
        doc["key"] = json!(e.key.as_deref().map(String::from_utf8_lossy));
        doc["headers"] = json!(
            e.headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect::<Vec<_>>()
        );
        doc["history"] = json!(
            history
                .iter()
                .map(|a| json!({"at": a.at, "who": a.who, "action": a.action, "detail": a.detail}))
                .collect::<Vec<_>>()
        );
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("dead letter {}", e.dlq_id);
    println!("  processor   {}", e.processor);
    println!(
        "  source      {} partition {} offset {}",
        e.topic, e.partition, e.offset
    );
    if let Some(id) = e.event_id {
        println!("  event id    {id}");
    }
    if let Some(id) = e.schema_id {
        println!("  schema id   {id}");
    }
    if let Some(key) = &e.key {
        println!("  key         {}", String::from_utf8_lossy(key));
    }
    for (k, v) in &e.headers {
        println!("  header      {k}: {}", String::from_utf8_lossy(v));
    }
    println!("  error       {}: {}", e.error_class, e.error_message);
    println!(
        "  failed at   {} after {} attempt(s)",
        e.failed_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        e.attempts
    );
    println!("  status      {}", e.status);
    if let Some(reason) = &e.reason {
        println!("  reason      {reason}");
    }
    println!("  raw         {} bytes", e.raw.len());
    for (i, chunk) in e.raw.chunks(16).enumerate().take(64) {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!("    {:08x}  {:<47}  {ascii}", i * 16, hex.join(" "));
    }
    if e.raw.len() > 64 * 16 {
        println!(
            "    … ({} more bytes; --json has them all)",
            e.raw.len() - 64 * 16
        );
    }
    println!("  as text     {text}");
    match &e.decoded {
        Some(v) => println!(
            "  decoded     {}",
            serde_json::to_string_pretty(v)?.replace('\n', "\n              ")
        ),
        None => println!("  decoded     (not decodable)"),
    }
    if history.is_empty() {
        println!("  history     (no changes)");
    }
    for a in &history {
        let detail = match &a.detail {
            Value::Object(m) if m.values().all(Value::is_null) => String::new(),
            Value::Null => String::new(),
            d => format!(" {d}"),
        };
        println!(
            "  history     {} {} by {}{detail}",
            a.at.to_rfc3339_opts(SecondsFormat::Secs, true),
            a.action,
            a.who
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The pending dead letters named by `ids`, or matched by `select`; and the ids given that are
/// not pending (or do not exist), to report.
async fn pending(
    ops: &Ops,
    ids: &[i64],
    select: &DlqSelect,
) -> Result<(Vec<DlqEntry>, Vec<String>)> {
    let filtered = select.processor.is_some()
        || select.error_class.is_some()
        || select.since.is_some()
        || select.until.is_some();
    if ids.is_empty() && !filtered {
        bail!(
            "name the dead letters: give ids, or filters (--processor, --error-class, --since, --until)"
        );
    }
    if !ids.is_empty() && filtered {
        bail!("give ids or filters, not both");
    }
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    if !ids.is_empty() {
        for &id in ids {
            match ops.store.dlq_get(id).await? {
                Some(e) if e.status == DlqStatus::Pending => out.push(e),
                Some(e) => skipped.push(format!("{id} is {}", e.status)),
                None => skipped.push(format!("{id} does not exist")),
            }
        }
        return Ok((out, skipped));
    }
    let mut filter = DlqFilter {
        limit: 1000,
        ..filter_of(select, Some(DlqStatus::Pending))?
    };
    loop {
        let page = ops.store.dlq_list(&filter).await?;
        let Some(last) = page.last() else { break };
        filter.after_id = last.dlq_id;
        out.extend(page);
    }
    Ok((out, skipped))
}

async fn replay(ops: &Ops, ids: &[i64], select: &DlqSelect, dry_run: bool) -> Result<ExitCode> {
    let (entries, skipped) = pending(ops, ids, select).await?;
    for s in &skipped {
        eprintln!("skipped: {s}");
    }
    // A dead action's raw bytes are the webhook body, not a record of `actions.requested`:
    // its action is scheduled again instead, and delivered under its own id.
    let (actions, entries): (Vec<DlqEntry>, Vec<DlqEntry>) = entries
        .into_iter()
        .partition(|e| e.processor == EXECUTOR_PROCESSOR);
    let mut by_topic: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &entries {
        *by_topic.entry(e.topic.as_str()).or_default() += 1;
    }
    let topics = by_topic
        .iter()
        .map(|(t, n)| format!("{n} to {t}"))
        .collect::<Vec<_>>()
        .join(", ");
    if dry_run {
        println!(
            "would re-publish {} dead letter(s){}{topics} and re-drive {} dead action(s); nothing changed",
            entries.len(),
            if topics.is_empty() { "" } else { ": " },
            actions.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut not_redriven = 0;
    if !actions.is_empty() {
        let ids: Vec<i64> = actions.iter().map(|e| e.dlq_id).collect();
        let redriven = ops.store.redrive_dead_actions(&ids, &ops.who).await?;
        for e in actions.iter().filter(|e| !redriven.contains(&e.dlq_id)) {
            not_redriven += 1;
            eprintln!(
                "skipped: {} (action {}) is no longer dead",
                e.dlq_id,
                e.event_id.map_or_else(|| "?".into(), |id| id.to_string())
            );
        }
        println!(
            "re-drove {} dead action(s): the executor delivers each once more under its own \
             webhook-id (a receiver that saw it dedups it)",
            redriven.len()
        );
    }
    let failed = !skipped.is_empty() || not_redriven > 0;
    if entries.is_empty() {
        if actions.is_empty() {
            println!("nothing to re-publish");
        }
        return Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        });
    }
    let url = ops.log_url()?.to_owned();
    let done = if url.starts_with("embedded://") {
        publish(ops, &open_embedded(&url)?, &entries).await?
    } else if url.starts_with("kafka://") {
        publish(ops, &KafkaLog::from_url(&url)?, &entries).await?
    } else {
        bail!("invalid log URL {url:?}: expected embedded://DIR or kafka://host:port");
    };
    println!(
        "re-published {done} dead letter(s) ({topics}) and marked them replayed; {} skipped",
        skipped.len() + not_redriven
    );
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Publishes `entries` chunk by chunk, marking each chunk replayed once the log acknowledged
/// it: a crash in between re-publishes that chunk on the next run, which the event ids absorb.
async fn publish<L: Log>(ops: &Ops, log: &L, entries: &[DlqEntry]) -> Result<u64> {
    let producer = log.producer()?;
    let bar = progress(entries.len() as u64, "re-publishing");
    let mut done = 0u64;
    let mut by_topic: BTreeMap<&str, Vec<&DlqEntry>> = BTreeMap::new();
    for e in entries {
        by_topic.entry(e.topic.as_str()).or_default().push(e);
    }
    for (topic, list) in by_topic {
        for chunk in list.chunks(CHUNK) {
            let records: Vec<Record> = chunk.iter().copied().map(record).collect();
            producer.send(topic, records).await.map_err(|e| {
                anyhow::anyhow!("cannot publish to {topic}: {e}; {done} re-published before this, the rest stay pending")
            })?;
            let ids: Vec<i64> = chunk.iter().map(|e| e.dlq_id).collect();
            let changed = ops
                .store
                .dlq_set_status(&ids, DlqStatus::Replayed, &ops.who, None)
                .await?;
            done += changed.len() as u64;
            bar.inc(chunk.len() as u64);
        }
    }
    bar.finish_and_clear();
    Ok(done)
}

/// The record of a dead letter as first consumed, plus where it first was.
fn record(e: &DlqEntry) -> Record {
    let mut headers: Vec<Header> = e
        .headers
        .iter()
        .map(|(k, v)| Header {
            key: k.clone(),
            value: v.clone(),
        })
        .collect();
    if !headers
        .iter()
        .any(|h| h.key == sluice_ingest_validator::DLQ_ORIGIN_HEADER)
    {
        headers.push(Header {
            key: sluice_ingest_validator::DLQ_ORIGIN_HEADER.into(),
            value: format!("{}:{}:{}", e.topic, e.partition, e.offset).into_bytes(),
        });
    }
    Record {
        key: e.key.clone(),
        value: e.raw.clone(),
        headers,
        timestamp_ms: None,
    }
}

async fn discard(
    ops: &Ops,
    ids: &[i64],
    select: &DlqSelect,
    reason: &str,
    dry_run: bool,
) -> Result<ExitCode> {
    if reason.trim().is_empty() {
        bail!("--reason must say why");
    }
    let (entries, skipped) = pending(ops, ids, select).await?;
    for s in &skipped {
        eprintln!("skipped: {s}");
    }
    if dry_run {
        println!(
            "would discard {} dead letter(s); nothing changed",
            entries.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bar = progress(entries.len() as u64, "discarding");
    let mut done = 0;
    for chunk in entries.chunks(CHUNK) {
        let ids: Vec<i64> = chunk.iter().map(|e| e.dlq_id).collect();
        done += ops
            .store
            .dlq_set_status(&ids, DlqStatus::Discarded, &ops.who, Some(reason))
            .await?
            .len();
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    println!("discarded {done} dead letter(s); {} skipped", skipped.len());
    Ok(if skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
