//! Backend-independent preparation of an append: duplicates within the batch, JSON text,
//! microsecond timestamps, and the outcome once the database said which ids were new.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use sluice_runtime::DeadLetter;
use uuid::Uuid;

use crate::model::{
    AppendBatch, AppendEvent, AppendOutcome, Appended, ConsumerOffset, NewDeadLetter,
};
use crate::{Error, Result};

/// Microseconds since the epoch: the precision of `timestamptz` and of the envelope.
pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`micros`].
pub(crate) fn from_micros(op: &'static str, us: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| Error::corrupt(op, format!("timestamp out of range: {us} µs")))
}

/// `t` cut to microseconds, so both backends store exactly the same instant.
pub(crate) fn trunc(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros(t)).unwrap_or(t)
}

/// One event of the batch that is not a repeat of an earlier one in the same batch.
#[derive(Debug)]
pub(crate) struct EventRow<'a> {
    pub src: &'a AppendEvent,
    pub occurred_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    pub payload: String,
    pub metadata: String,
    pub schema_version: Option<i64>,
}

/// One dead letter, ready to bind.
#[derive(Debug)]
pub(crate) struct DeadRow<'a> {
    pub letter: &'a DeadLetter,
    pub decoded: Option<String>,
    pub failed_at: DateTime<Utc>,
    pub schema_id: Option<i64>,
    pub attempts: i32,
    /// The headers as stored: a JSON array of `[key, value]`, values as UTF-8 text.
    pub headers: String,
}

/// A batch ready to bind.
#[derive(Debug)]
pub(crate) struct Prepared<'a> {
    batch: &'a AppendBatch,
    /// First occurrences, in batch order.
    pub events: Vec<EventRow<'a>>,
    pub dead: Vec<DeadRow<'a>>,
    /// Offsets, one per (group, topic, partition), last one winning, sorted by key so that
    /// concurrent committers lock rows in the same order.
    pub offsets: Vec<(&'a str, &'a str, i32, i64)>,
}

impl<'a> Prepared<'a> {
    pub fn new(batch: &'a AppendBatch) -> Result<Self> {
        let mut seen = HashSet::with_capacity(batch.events.len());
        let mut events = Vec::with_capacity(batch.events.len());
        for src in &batch.events {
            if !seen.insert(src.event.event_id) {
                continue;
            }
            let e = &src.event;
            events.push(EventRow {
                src,
                occurred_at: trunc(e.occurred_at),
                ingested_at: trunc(e.ingested_at),
                payload: json_text("append", &e.payload)?,
                metadata: json_text("append", &e.metadata)?,
                schema_version: e.metadata.schema_version.map(i64::from),
            });
        }
        let dead = batch.dead_letters.iter().map(DeadRow::new).collect();
        Ok(Self {
            batch,
            events,
            dead,
            offsets: offset_rows(&batch.offsets),
        })
    }

    /// The outcome, given the position of every event the database stored.
    pub fn outcome(&self, stored: &HashMap<Uuid, i64>, dead_letter_ids: Vec<i64>) -> AppendOutcome {
        let mut out = AppendOutcome {
            dead_letter_ids,
            ..AppendOutcome::default()
        };
        let mut first = HashSet::with_capacity(self.batch.events.len());
        for src in &self.batch.events {
            let id = src.event.event_id;
            match stored.get(&id) {
                Some(&position) if first.insert(id) => out.appended.push(Appended {
                    event_id: id,
                    position,
                }),
                _ => out.duplicates.push(id),
            }
        }
        out
    }
}

impl<'a> DeadRow<'a> {
    pub(crate) fn new(d: &'a NewDeadLetter) -> Self {
        let l = &d.letter;
        let decoded = match &d.decoded {
            Some(v) => serde_json::to_string(v).ok(),
            None => serde_json::from_slice::<serde_json::Value>(&l.raw)
                .ok()
                .and_then(|v| serde_json::to_string(&v).ok()),
        }
        // Postgres `jsonb` cannot hold U+0000; the raw bytes are kept either way, and a dead
        // letter must never fail to store because of what it contains.
        .filter(|text| !text.contains("\\u0000"));
        Self {
            letter: l,
            decoded,
            failed_at: trunc(l.failed_at),
            schema_id: l.schema_id.map(i64::from),
            attempts: i32::try_from(l.attempts).unwrap_or(i32::MAX),
            headers: headers_json(&l.headers),
        }
    }
}

/// Headers as the DLQ stores them. Sluice's headers are text; other bytes are kept lossily
/// (and U+0000, which `jsonb` refuses, is dropped).
pub(crate) fn headers_json(headers: &[(String, Vec<u8>)]) -> String {
    let pairs: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.replace('\0', ""),
                String::from_utf8_lossy(v).replace('\0', ""),
            )
        })
        .collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
}

/// Headers as read back from the DLQ.
pub(crate) fn headers_from_json(op: &'static str, text: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let pairs: Vec<(String, String)> = serde_json::from_str(text)
        .map_err(|e| crate::Error::corrupt(op, format!("bad headers in a row: {e}")))?;
    Ok(pairs
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect())
}

/// Offsets, one per (group, topic, partition), last one winning, sorted by key so that
/// concurrent committers lock rows in the same order.
pub(crate) fn offset_rows(offsets: &[ConsumerOffset]) -> Vec<(&str, &str, i32, i64)> {
    let mut last = BTreeMap::new();
    for o in offsets {
        last.insert(
            (o.group.as_str(), o.topic.as_str(), o.partition),
            o.next_offset,
        );
    }
    last.into_iter()
        .map(|((g, t, p), o)| (g, t, p, o))
        .collect()
}

fn json_text<T: serde::Serialize>(op: &'static str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::InvalidArgument {
        op,
        reason: format!("cannot encode JSON: {e}"),
    })
}

/// Splits `n` rows into chunks whose sizes are powers of two no larger than `max`, so that a
/// multi-row statement only ever has a handful of shapes (and stays in the statement cache).
pub(crate) fn chunk_sizes(mut n: usize, max: usize) -> Vec<usize> {
    let mut out = Vec::new();
    while n > 0 {
        let size = if n >= max {
            max
        } else {
            1 << (usize::BITS - 1 - n.leading_zeros())
        };
        out.push(size);
        n -= size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_exactly_with_few_shapes() {
        for n in 0..2000 {
            let c = chunk_sizes(n, 256);
            assert_eq!(c.iter().sum::<usize>(), n);
            assert!(c.iter().all(|s| s.is_power_of_two() && *s <= 256));
        }
        assert_eq!(chunk_sizes(300, 256), vec![256, 32, 8, 4]);
    }

    #[test]
    fn truncation_keeps_microseconds() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        assert_eq!(trunc(t).timestamp_subsec_nanos(), 123_456_000);
        assert_eq!(from_micros("t", micros(t)).unwrap(), trunc(t));
    }
}
