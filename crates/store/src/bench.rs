//! The baseline of `sluice bench ingest`: how fast this PostgreSQL server takes the same rows
//! through a raw `COPY`, into scratch tables made `LIKE` the store's own (same columns, same
//! indexes), measured in the same run so that the append rate has something to be compared to.
//!
//! It only ever writes to the scratch tables it creates, and drops them before it returns, also
//! when it fails. It never touches `events`, `event_ids` or `outbox` themselves.

use std::fmt::Write as _;
use std::time::Instant;

use chrono::SecondsFormat;
use serde::Serialize;
use sqlx::{Connection, Executor, PgConnection};

use crate::error::db;
use crate::model::AppendEvent;
use crate::{Error, Result};

const OP: &str = "copy baseline";

/// Rows per second of the two `COPY` runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CopyBaseline {
    /// One `COPY` of every row into a table like `events`, in one transaction.
    pub events_rows_per_s: f64,
    /// The same rows into tables like `events`, `event_ids` and `outbox` (what an append
    /// writes), three `COPY`s in one transaction.
    pub all_tables_rows_per_s: f64,
}

/// Copies `rows` (as [`crate::Store::append`] would store them; positions are numbered from 1)
/// into scratch tables on the PostgreSQL database at `url`, which must be migrated, and returns
/// the rates. The CSV text is built before the clock starts: this measures the server.
pub async fn copy_baseline(url: &str, rows: &[AppendEvent]) -> Result<CopyBaseline> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(Error::InvalidArgument {
            op: OP,
            reason: "the COPY baseline needs a postgres:// store".to_owned(),
        });
    }
    if rows.is_empty() {
        return Err(Error::InvalidArgument {
            op: OP,
            reason: "no rows to copy".to_owned(),
        });
    }
    let csv = Csv::new(rows, 1)?;
    let mut conn = PgConnection::connect(url).await.map_err(db(OP))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let prefix = format!("sluice_bench_{}_{stamp}", std::process::id());
    let tables = Tables {
        events: format!("{prefix}_events"),
        ids: format!("{prefix}_event_ids"),
        outbox: format!("{prefix}_outbox"),
    };
    let result = measure(&mut conn, &tables, &csv).await;
    // Dropped whatever happened; a failure to drop is reported only if the run itself worked.
    let dropped = conn
        .execute(
            format!(
                "DROP TABLE IF EXISTS {}, {}, {}",
                tables.events, tables.ids, tables.outbox
            )
            .as_str(),
        )
        .await
        .map_err(db(OP));
    let _ = conn.close().await;
    let baseline = result?;
    dropped?;
    Ok(baseline)
}

struct Tables {
    events: String,
    ids: String,
    outbox: String,
}

async fn measure(conn: &mut PgConnection, t: &Tables, csv: &Csv) -> Result<CopyBaseline> {
    // LIKE copies columns, defaults, identity, constraints and indexes, not the partitioning
    // or the append-only trigger (an UPDATE trigger, which a COPY never fires).
    for (scratch, like) in [
        (&t.events, "events"),
        (&t.ids, "event_ids"),
        (&t.outbox, "outbox"),
    ] {
        conn.execute(format!("CREATE TABLE {scratch} (LIKE {like} INCLUDING ALL)").as_str())
            .await
            .map_err(db(OP))?;
    }
    let n = csv.rows as f64;

    let start = Instant::now();
    let mut tx = conn.begin().await.map_err(db(OP))?;
    copy(&mut tx, &t.events, EVENTS_COLUMNS, &csv.events, csv.rows).await?;
    tx.commit().await.map_err(db(OP))?;
    let events_rows_per_s = n / start.elapsed().as_secs_f64();

    // A second events table, so this run does not pay for the rows the first one left.
    let events2 = format!("{}_2", t.events);
    conn.execute(format!("CREATE TABLE {events2} (LIKE events INCLUDING ALL)").as_str())
        .await
        .map_err(db(OP))?;
    let start = Instant::now();
    let copied = async {
        let mut tx = conn.begin().await.map_err(db(OP))?;
        copy(&mut tx, &events2, EVENTS_COLUMNS, &csv.events, csv.rows).await?;
        copy(&mut tx, &t.ids, IDS_COLUMNS, &csv.ids, csv.rows).await?;
        copy(&mut tx, &t.outbox, OUTBOX_COLUMNS, &csv.outbox, csv.rows).await?;
        tx.commit().await.map_err(db(OP))
    }
    .await;
    let all_tables_rows_per_s = n / start.elapsed().as_secs_f64();
    let dropped = conn
        .execute(format!("DROP TABLE IF EXISTS {events2}").as_str())
        .await
        .map_err(db(OP));
    copied?;
    dropped?;
    Ok(CopyBaseline {
        events_rows_per_s,
        all_tables_rows_per_s,
    })
}

const EVENTS_COLUMNS: &str = "position, event_id, event_type, aggregate_id, occurred_at, \
                              ingested_at, payload, metadata, schema_version";
const IDS_COLUMNS: &str = "event_id, ingested_at, position";
const OUTBOX_COLUMNS: &str = "event_id, aggregate_id, topic, key, value";

async fn copy(
    conn: &mut PgConnection,
    table: &str,
    columns: &str,
    data: &[u8],
    rows: usize,
) -> Result<()> {
    let statement = format!("COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)");
    let mut sink = conn.copy_in_raw(&statement).await.map_err(db(OP))?;
    if let Err(e) = sink.send(data).await {
        let _ = sink.abort("send failed").await;
        return Err(Error::db(OP, e));
    }
    let copied = sink.finish().await.map_err(db(OP))?;
    if copied != rows as u64 {
        return Err(Error::corrupt(
            OP,
            format!("COPY into {table} took {copied} rows of {rows}"),
        ));
    }
    Ok(())
}

/// The rows as CSV, one text per table.
struct Csv {
    rows: usize,
    events: Vec<u8>,
    ids: Vec<u8>,
    outbox: Vec<u8>,
}

impl Csv {
    fn new(rows: &[AppendEvent], first_position: i64) -> Result<Csv> {
        let (mut events, mut ids, mut outbox) = (String::new(), String::new(), String::new());
        for (i, row) in rows.iter().enumerate() {
            let e = &row.event;
            let position = first_position + i as i64;
            let ingested = e.ingested_at.to_rfc3339_opts(SecondsFormat::Micros, true);
            let schema_version = e
                .metadata
                .schema_version
                .map_or(String::new(), |v| v.to_string());
            let _ = writeln!(
                events,
                "{position},{},{},{},{},{ingested},{},{},{schema_version}",
                e.event_id,
                quoted(e.event_type.as_str()),
                quoted(&e.aggregate_id),
                e.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
                quoted(&json(&e.payload)?),
                quoted(&json(&e.metadata)?),
            );
            let _ = writeln!(ids, "{},{ingested},{position}", e.event_id);
            let _ = writeln!(
                outbox,
                "{},{},{},{},{}",
                e.event_id,
                quoted(&e.aggregate_id),
                quoted(&row.topic),
                hex(&row.key),
                hex(&row.value)
            );
        }
        Ok(Csv {
            rows: rows.len(),
            events: events.into_bytes(),
            ids: ids.into_bytes(),
            outbox: outbox.into_bytes(),
        })
    }
}

/// A CSV field in quotes, its quotes doubled.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `bytea` in hex input form (`\x…`); a backslash means nothing special in CSV.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("\\x");
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// JSON text of the payload or the metadata, as the store writes them.
fn json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::corrupt(OP, format!("cannot write JSON: {e}")))
}

/// A database of its own on a PostgreSQL server, for a bench that fills an event store (the
/// store given is never written to) or for a test. Drop it with [`ScratchDatabase::drop_now`].
#[derive(Debug)]
pub struct ScratchDatabase {
    admin_url: String,
    name: String,
    /// Its URL (the server's, with the scratch database).
    pub url: String,
}

impl ScratchDatabase {
    /// Creates `<prefix>_<random>` on the server of `url` (connecting to `url`'s own database
    /// to do it). `prefix` must be a plain SQL name.
    pub async fn create(url: &str, prefix: &str) -> Result<ScratchDatabase> {
        const OP: &str = "create a scratch database";
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(url).await.map_err(db(OP))?;
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .map_err(db(OP))?;
        let _ = conn.close().await;
        Ok(ScratchDatabase {
            admin_url: url.to_owned(),
            url: with_database(url, &name),
            name,
        })
    }

    /// Drops it, closing whatever still connects to it.
    pub async fn drop_now(self) -> Result<()> {
        const OP: &str = "drop a scratch database";
        let mut conn = PgConnection::connect(&self.admin_url)
            .await
            .map_err(db(OP))?;
        conn.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await
            .map_err(db(OP))?;
        let _ = conn.close().await;
        Ok(())
    }
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (authority, query) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path.split_once('?').map(|(_, q)| q)),
        None => (
            rest.split_once('?').map_or(rest, |(a, _)| a),
            rest.split_once('?').map(|(_, q)| q),
        ),
    };
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

/// Writes `rows` into the `events` and `event_ids` tables of the migrated store at `url` by
/// `COPY`, positions numbered from `first_position`, in one transaction (no outbox: nothing is
/// to be relayed). Returns the time the `COPY`s took; the CSV is built before the clock
/// starts. For benches on a [`ScratchDatabase`], where it is also the same-run baseline.
pub async fn seed_events(
    url: &str,
    rows: &[AppendEvent],
    first_position: i64,
) -> Result<std::time::Duration> {
    let csv = Csv::new(rows, first_position)?;
    let mut conn = PgConnection::connect(url).await.map_err(db(OP))?;
    let start = Instant::now();
    let mut tx = conn.begin().await.map_err(db(OP))?;
    copy(&mut tx, "events", EVENTS_COLUMNS, &csv.events, csv.rows).await?;
    copy(&mut tx, "event_ids", IDS_COLUMNS, &csv.ids, csv.rows).await?;
    tx.commit().await.map_err(db(OP))?;
    let took = start.elapsed();
    let _ = conn.close().await;
    Ok(took)
}

/// Runs `sql` on the PostgreSQL database at `url`, `warmup` times unmeasured and then `runs`
/// times, on one connection as a prepared statement; returns the rows of the last run and the
/// time of each measured run (all rows fetched).
pub async fn time_query(
    url: &str,
    sql: &str,
    warmup: usize,
    runs: usize,
) -> Result<(usize, Vec<std::time::Duration>)> {
    const OP: &str = "time a query";
    let mut conn = PgConnection::connect(url).await.map_err(db(OP))?;
    let mut rows = 0;
    let mut times = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let started = Instant::now();
        rows = sqlx::query(sql)
            .fetch_all(&mut conn)
            .await
            .map_err(db(OP))?
            .len();
        if i >= warmup {
            times.push(started.elapsed());
        }
    }
    conn.close().await.map_err(db(OP))?;
    Ok((rows, times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_bytes_are_hex() {
        assert_eq!(quoted(r#"{"a":"b"}"#), r#""{""a"":""b""}""#);
        assert_eq!(hex(&[0, 0xab, 0x10]), r"\x00ab10");
    }
}
