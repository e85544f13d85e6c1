//! Typed reads for the SQL endpoint: named columns of a store table, simple filters, a limit,
//! and several such reads in one consistent snapshot (the hot read models together with the
//! projector offsets they reflect).
//!
//! The SQL is built here from a fixed list of tables and checked identifiers, and every value
//! is bound, never formatted in. Times are bound as instants (`timestamptz` on Postgres,
//! microseconds on SQLite), so an answer never depends on a session time zone.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{Postgres, Row, Sqlite};

use crate::error::db;
use crate::prepare::micros;
use crate::{Error, Inner, Result, Store};

/// The store tables the SQL endpoint may read. `actions` and `action_ledger` are the action
/// ledger view; `actions.destructive` is a boolean on Postgres, which no [`ColumnType`] reads.
pub const READABLE_TABLES: [&str; 10] = [
    "events",
    "dlq",
    "readings",
    "readings_1m",
    "readings_1h",
    "device_latest",
    "anomalies",
    "consumer_offsets",
    "actions",
    "action_ledger",
];

/// How a column is read, whatever the backend stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// Text.
    Text,
    /// A 64-bit integer (any integer column).
    Int,
    /// A 64-bit float.
    Float,
    /// An instant, read as microseconds since the epoch (UTC).
    Timestamp,
    /// A UUID, read as its text form.
    Uuid,
    /// JSON, read as text.
    Json,
    /// Bytes.
    Bytes,
}

/// A literal to compare a column with.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text (also for UUID columns).
    Text(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// An instant.
    Timestamp(DateTime<Utc>),
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `<>`
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
}

impl Op {
    fn sql(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::NotEq => "<>",
            Op::Lt => "<",
            Op::LtEq => "<=",
            Op::Gt => ">",
            Op::GtEq => ">=",
        }
    }
}

/// `column op value`; rows where the column is NULL never match.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The column.
    pub column: String,
    /// The comparison.
    pub op: Op,
    /// The literal.
    pub value: Value,
}

/// One read: `SELECT columns FROM table WHERE filters (AND) LIMIT limit`.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    /// One of [`READABLE_TABLES`].
    pub table: String,
    /// The columns and how to read them.
    pub columns: Vec<(String, ColumnType)>,
    /// Conditions, all of which must hold.
    pub filters: Vec<Filter>,
    /// Most rows returned.
    pub limit: Option<u64>,
}

/// One column of a result, in row order.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// Text, UUID and JSON columns.
    Text(Vec<Option<String>>),
    /// Integers.
    Int(Vec<Option<i64>>),
    /// Floats.
    Float(Vec<Option<f64>>),
    /// Microseconds since the epoch, UTC.
    Timestamp(Vec<Option<i64>>),
    /// Bytes.
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Column {
    fn new(ty: ColumnType) -> Column {
        match ty {
            ColumnType::Text | ColumnType::Uuid | ColumnType::Json => Column::Text(Vec::new()),
            ColumnType::Int => Column::Int(Vec::new()),
            ColumnType::Float => Column::Float(Vec::new()),
            ColumnType::Timestamp => Column::Timestamp(Vec::new()),
            ColumnType::Bytes => Column::Bytes(Vec::new()),
        }
    }

    /// Rows in this column.
    pub fn len(&self) -> usize {
        match self {
            Column::Text(v) => v.len(),
            Column::Int(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::Timestamp(v) => v.len(),
            Column::Bytes(v) => v.len(),
        }
    }

    /// True when the column has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The result of one [`Select`]: its columns, in the order asked for.
pub type Columns = Vec<Column>;

fn identifier(name: &str) -> Result<&str> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(name)
    } else {
        Err(Error::InvalidArgument {
            op: OP,
            reason: format!("not a column name: {name:?}"),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Postgres,
    Sqlite,
}

fn build(select: &Select, dialect: Dialect) -> Result<String> {
    if !READABLE_TABLES.contains(&select.table.as_str()) {
        return Err(Error::InvalidArgument {
            op: OP,
            reason: format!("the store has no readable table {:?}", select.table),
        });
    }
    if select.columns.is_empty() {
        return Err(Error::InvalidArgument {
            op: OP,
            reason: "a select needs at least one column".into(),
        });
    }
    let mut cols = Vec::with_capacity(select.columns.len());
    for (name, ty) in &select.columns {
        let name = identifier(name)?;
        cols.push(match (dialect, ty) {
            (Dialect::Postgres, ColumnType::Uuid | ColumnType::Json) => format!("{name}::text"),
            (Dialect::Postgres, ColumnType::Int) => format!("{name}::int8"),
            (Dialect::Postgres, ColumnType::Float) => format!("{name}::float8"),
            (Dialect::Sqlite, ColumnType::Float) => format!("CAST({name} AS REAL)"),
            _ => name.to_owned(),
        });
    }
    let mut sql = format!("SELECT {} FROM {}", cols.join(", "), select.table);
    for (i, f) in select.filters.iter().enumerate() {
        let column = identifier(&f.column)?;
        let param = match dialect {
            Dialect::Postgres => format!("${}", i + 1),
            Dialect::Sqlite => format!("?{}", i + 1),
        };
        let is_uuid = select
            .columns
            .iter()
            .any(|(c, t)| c == column && *t == ColumnType::Uuid);
        let lhs = if is_uuid && dialect == Dialect::Postgres {
            format!("{column}::text")
        } else {
            column.to_owned()
        };
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        sql.push_str(&format!("{lhs} {} {param}", f.op.sql()));
    }
    if let Some(limit) = select.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    Ok(sql)
}

fn bind_pg<'q>(
    mut query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    filters: &'q [Filter],
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    for f in filters {
        query = match &f.value {
            Value::Text(v) => query.bind(v.as_str()),
            Value::Int(v) => query.bind(*v),
            Value::Float(v) => query.bind(*v),
            Value::Timestamp(v) => query.bind(*v),
        };
    }
    query
}

fn bind_sqlite<'q>(
    mut query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    filters: &'q [Filter],
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for f in filters {
        query = match &f.value {
            Value::Text(v) => query.bind(v.as_str()),
            Value::Int(v) => query.bind(*v),
            Value::Float(v) => query.bind(*v),
            Value::Timestamp(v) => query.bind(micros(*v)),
        };
    }
    query
}

const OP: &str = "select for the SQL endpoint";

fn push_pg(columns: &mut [Column], row: &PgRow) -> Result<()> {
    for (i, column) in columns.iter_mut().enumerate() {
        match column {
            Column::Text(v) => v.push(row.try_get(i).map_err(db(OP))?),
            Column::Int(v) => v.push(row.try_get(i).map_err(db(OP))?),
            Column::Float(v) => v.push(row.try_get(i).map_err(db(OP))?),
            Column::Timestamp(v) => {
                let t: Option<DateTime<Utc>> = row.try_get(i).map_err(db(OP))?;
                v.push(t.map(micros));
            }
            Column::Bytes(v) => v.push(row.try_get(i).map_err(db(OP))?),
        }
    }
    Ok(())
}

fn push_sqlite(columns: &mut [Column], row: &SqliteRow) -> Result<()> {
    for (i, column) in columns.iter_mut().enumerate() {
        match column {
            Column::Text(v) => v.push(row.try_get(i).map_err(db(OP))?),
            Column::Int(v) | Column::Timestamp(v) => v.push(row.try_get(i).map_err(db(OP))?),
            Column::Float(v) => v.push(row.try_get(i).map_err(db(OP))?),
            Column::Bytes(v) => v.push(row.try_get(i).map_err(db(OP))?),
        }
    }
    Ok(())
}

fn empty(select: &Select) -> Columns {
    select
        .columns
        .iter()
        .map(|(_, t)| Column::new(*t))
        .collect()
}

impl Store {
    /// Runs one typed read.
    pub async fn select(&self, select: &Select) -> Result<Columns> {
        let mut out = self.select_snapshot(std::slice::from_ref(select)).await?;
        Ok(out.remove(0))
    }

    /// Runs several typed reads in one read-only snapshot (Postgres: a repeatable-read
    /// transaction; SQLite: one read transaction), so they see the same committed state.
    pub async fn select_snapshot(&self, selects: &[Select]) -> Result<Vec<Columns>> {
        use futures::TryStreamExt;
        let mut results = Vec::with_capacity(selects.len());
        match &self.inner {
            Inner::Postgres(s) => {
                let mut tx = s.pool().begin().await.map_err(db(OP))?;
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .execute(&mut *tx)
                    .await
                    .map_err(db(OP))?;
                for select in selects {
                    let sql = build(select, Dialect::Postgres)?;
                    let mut columns = empty(select);
                    let mut rows = bind_pg(sqlx::query(&sql), &select.filters).fetch(&mut *tx);
                    while let Some(row) = rows.try_next().await.map_err(db(OP))? {
                        push_pg(&mut columns, &row)?;
                    }
                    drop(rows);
                    results.push(columns);
                }
                tx.commit().await.map_err(db(OP))?;
            }
            Inner::Sqlite(s) => {
                let mut tx = s.reader_pool().begin().await.map_err(db(OP))?;
                for select in selects {
                    let sql = build(select, Dialect::Sqlite)?;
                    let mut columns = empty(select);
                    let mut rows = bind_sqlite(sqlx::query(&sql), &select.filters).fetch(&mut *tx);
                    while let Some(row) = rows.try_next().await.map_err(db(OP))? {
                        push_sqlite(&mut columns, &row)?;
                    }
                    drop(rows);
                    results.push(columns);
                }
                tx.commit().await.map_err(db(OP))?;
            }
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(table: &str, column: &str) -> Select {
        Select {
            table: table.into(),
            columns: vec![(column.into(), ColumnType::Text)],
            filters: vec![],
            limit: None,
        }
    }

    #[test]
    fn only_known_tables_and_plain_identifiers_are_accepted() {
        assert!(build(&select("events", "event_type"), Dialect::Postgres).is_ok());
        assert!(build(&select("api_keys", "hash"), Dialect::Postgres).is_err());
        assert!(build(&select("events", "x; drop table events"), Dialect::Sqlite).is_err());
        assert!(build(&select("events", "\"X\""), Dialect::Sqlite).is_err());
    }

    #[test]
    fn filters_are_bound_not_formatted() {
        let mut s = select("readings", "device_id");
        s.filters.push(Filter {
            column: "device_id".into(),
            op: Op::Eq,
            value: Value::Text("'; drop table readings; --".into()),
        });
        s.limit = Some(5);
        let sql = build(&s, Dialect::Postgres).unwrap();
        assert_eq!(
            sql,
            "SELECT device_id FROM readings WHERE device_id = $1 LIMIT 5"
        );
    }
}
