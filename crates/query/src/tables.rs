//! The tables of the SQL endpoint: hot ones served from Arrow in memory, cold ones read from
//! the store with the filters and columns of the query pushed down.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BinaryArray, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::catalog::Session;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use sluice_store::{Column, ColumnType, Filter, Op, Select, Store, Value};

use crate::hot::{Hot, ts_type};

/// Which hot table.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HotKind {
    Readings,
    Rollups,
    Latest,
}

/// A hot table: every scan sees a snapshot of the Arrow batches held.
pub(crate) struct HotTable {
    hot: Arc<Hot>,
    kind: HotKind,
    schema: SchemaRef,
    partitions: usize,
}

impl fmt::Debug for HotTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HotTable")
            .field("kind", &self.kind)
            .finish()
    }
}

impl HotTable {
    pub(crate) fn new(hot: Arc<Hot>, kind: HotKind, partitions: usize) -> HotTable {
        let schema = match kind {
            HotKind::Readings => crate::hot::readings_schema(),
            HotKind::Rollups => crate::hot::rollup_schema(),
            HotKind::Latest => crate::hot::latest_schema(),
        };
        HotTable {
            hot,
            kind,
            schema,
            partitions: partitions.max(1),
        }
    }
}

#[async_trait]
impl TableProvider for HotTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // Bounds on `at` skip whole batches; DataFusion still applies every filter.
        Ok(filters
            .iter()
            .map(|f| match (self.kind, at_bound(f)) {
                (HotKind::Readings, Some(_)) => TableProviderFilterPushDown::Inexact,
                _ => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let batches = match self.kind {
            HotKind::Readings => {
                let (mut lo, mut hi) = (i64::MIN, i64::MAX);
                for (op, t) in filters.iter().filter_map(at_bound) {
                    match op {
                        Op::Gt | Op::GtEq => lo = lo.max(t),
                        Op::Lt | Op::LtEq => hi = hi.min(t),
                        Op::Eq => (lo, hi) = (lo.max(t), hi.min(t)),
                        Op::NotEq => {}
                    }
                }
                within(self.hot.readings(), lo, hi)
            }
            HotKind::Rollups => vec![self.hot.rollups()],
            HotKind::Latest => vec![self.hot.latest()],
        };
        // Split large batches so both cores scan.
        let mut partitions = vec![Vec::new(); self.partitions];
        let mut i = 0;
        for b in batches {
            let n = b.num_rows();
            let chunk = n.div_ceil(self.partitions).max(8192);
            let mut offset = 0;
            while offset < n {
                let len = chunk.min(n - offset);
                partitions[i % self.partitions].push(b.slice(offset, len));
                offset += len;
                i += 1;
            }
        }
        Ok(MemorySourceConfig::try_new_exec(
            &partitions,
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// `at <op> <instant>`, as (op, µs).
fn at_bound(expr: &Expr) -> Option<(Op, i64)> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr else {
        return None;
    };
    let (column, op, literal) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), Expr::Literal(v, _)) => (c, *op, v),
        (Expr::Literal(v, _), Expr::Column(c)) => (c, flip(*op)?, v),
        _ => return None,
    };
    if column.name != "at" {
        return None;
    }
    let us = match literal {
        ScalarValue::TimestampMicrosecond(Some(us), _) => *us,
        ScalarValue::TimestampNanosecond(Some(ns), _) => ns.div_euclid(1000),
        ScalarValue::TimestampMillisecond(Some(ms), _) => ms.checked_mul(1000)?,
        ScalarValue::TimestampSecond(Some(s), _) => s.checked_mul(1_000_000)?,
        _ => return None,
    };
    let op = match op {
        Operator::Eq => Op::Eq,
        Operator::Lt => Op::Lt,
        Operator::LtEq => Op::LtEq,
        Operator::Gt => Op::Gt,
        Operator::GtEq => Op::GtEq,
        _ => return None,
    };
    Some((op, us))
}

/// The batches that may hold readings with `lo <= at <= hi` (bounds inclusive, so a strict
/// comparison keeps its edge batch; the filter above drops the edge rows).
fn within(batches: Vec<RecordBatch>, lo: i64, hi: i64) -> Vec<RecordBatch> {
    use datafusion::arrow::compute::{max, min};
    if lo == i64::MIN && hi == i64::MAX {
        return batches;
    }
    batches
        .into_iter()
        .filter(|b| {
            let Some(at) = b
                .column(2)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
            else {
                return true;
            };
            match (min(at), max(at)) {
                (Some(first), Some(last)) => last >= lo && first <= hi,
                _ => false,
            }
        })
        .collect()
}

/// A store table read on demand. Filters of the form `column op literal` are sent to the
/// store (bound as values, instants as instants); DataFusion applies every filter again, so
/// one the store cannot take is still honoured.
pub(crate) struct ColdTable {
    store: Store,
    /// The runtime store reads run on: the service's, where the store's connections live. The
    /// query threads have no I/O driver, and end with their engine.
    io: tokio::runtime::Handle,
    table: &'static str,
    columns: Vec<(String, ColumnType)>,
    fixed: Vec<Filter>,
    schema: SchemaRef,
    max_rows: u64,
}

impl fmt::Debug for ColdTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ColdTable")
            .field("table", &self.table)
            .finish()
    }
}

impl ColdTable {
    pub(crate) fn new(
        store: Store,
        io: tokio::runtime::Handle,
        table: &'static str,
        columns: Vec<(String, ColumnType)>,
        fixed: Vec<Filter>,
        max_rows: u64,
    ) -> ColdTable {
        let fields: Vec<Field> = columns
            .iter()
            .map(|(name, ty)| Field::new(name, arrow_type(*ty), true))
            .collect();
        ColdTable {
            store,
            io,
            table,
            columns,
            fixed,
            schema: Arc::new(Schema::new(fields)),
            max_rows,
        }
    }

    fn column_type(&self, name: &str) -> Option<ColumnType> {
        self.columns
            .iter()
            .find(|(c, _)| *c == name)
            .map(|(_, t)| *t)
    }

    /// The store filter for `expr`, when it has a form the store takes.
    fn pushable(&self, expr: &Expr) -> Option<Filter> {
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr else {
            return None;
        };
        let (column, op, literal) = match (left.as_ref(), right.as_ref()) {
            (Expr::Column(c), Expr::Literal(v, _)) => (c, *op, v),
            (Expr::Literal(v, _), Expr::Column(c)) => (c, flip(*op)?, v),
            _ => return None,
        };
        let op = match op {
            Operator::Eq => Op::Eq,
            Operator::NotEq => Op::NotEq,
            Operator::Lt => Op::Lt,
            Operator::LtEq => Op::LtEq,
            Operator::Gt => Op::Gt,
            Operator::GtEq => Op::GtEq,
            _ => return None,
        };
        let ty = self.column_type(&column.name)?;
        let value = match (ty, literal) {
            (ColumnType::Text, ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s))) => {
                Value::Text(s.clone())
            }
            (ColumnType::Int, ScalarValue::Int64(Some(v))) => Value::Int(*v),
            (ColumnType::Int, ScalarValue::Int32(Some(v))) => Value::Int(i64::from(*v)),
            (ColumnType::Float, ScalarValue::Float64(Some(v))) => Value::Float(*v),
            (ColumnType::Timestamp, ScalarValue::TimestampMicrosecond(Some(us), _)) => {
                Value::Timestamp(chrono::DateTime::from_timestamp_micros(*us)?)
            }
            (ColumnType::Timestamp, ScalarValue::TimestampNanosecond(Some(ns), _)) => {
                Value::Timestamp(chrono::DateTime::from_timestamp_nanos(*ns))
            }
            _ => return None,
        };
        Some(Filter {
            column: column.name.clone(),
            op,
            value,
        })
    }
}

fn flip(op: Operator) -> Option<Operator> {
    Some(match op {
        Operator::Eq => Operator::Eq,
        Operator::NotEq => Operator::NotEq,
        Operator::Lt => Operator::Gt,
        Operator::LtEq => Operator::GtEq,
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        _ => return None,
    })
}

fn arrow_type(ty: ColumnType) -> DataType {
    match ty {
        ColumnType::Text | ColumnType::Uuid | ColumnType::Json => DataType::Utf8,
        ColumnType::Int => DataType::Int64,
        ColumnType::Float => DataType::Float64,
        ColumnType::Timestamp => ts_type(),
        ColumnType::Bytes => DataType::Binary,
    }
}

fn to_array(column: Column) -> ArrayRef {
    match column {
        Column::Text(v) => Arc::new(StringArray::from(v)),
        Column::Int(v) => Arc::new(Int64Array::from(v)),
        Column::Float(v) => Arc::new(Float64Array::from(v)),
        Column::Timestamp(v) => Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC")),
        Column::Bytes(v) => Arc::new(BinaryArray::from_iter(v)),
    }
}

/// A store read that ends with the query waiting for it (stopped at its time limit).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[async_trait]
impl TableProvider for ColdTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if self.pushable(f).is_some() {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.columns.len()).collect(),
        };
        // `count(*)` projects nothing; read one column to count rows.
        let read: Vec<usize> = if indices.is_empty() {
            vec![0]
        } else {
            indices.clone()
        };
        let mut pushed = self.fixed.clone();
        pushed.extend(filters.iter().filter_map(|f| self.pushable(f)));
        let cap = limit.map_or(self.max_rows + 1, |l| (l as u64).min(self.max_rows + 1));
        let select = Select {
            table: self.table.to_owned(),
            columns: read.iter().map(|&i| self.columns[i].clone()).collect(),
            filters: pushed,
            limit: Some(cap),
        };
        let store = self.store.clone();
        let mut read = AbortOnDrop(self.io.spawn(async move { store.select(&select).await }));
        let columns = (&mut read.0)
            .await
            .map_err(|e| DataFusionError::Internal(format!("the store read failed: {e}")))?
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let rows = columns.first().map_or(0, Column::len);
        if rows as u64 > self.max_rows {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "table {} would read more than {} rows from the store; narrow the query with a \
                 filter on its columns",
                self.table, self.max_rows
            )));
        }
        let schema = Arc::new(self.schema.project(&indices)?);
        let batch = if indices.is_empty() {
            RecordBatch::try_new_with_options(
                schema.clone(),
                vec![],
                &RecordBatchOptions::new().with_row_count(Some(rows)),
            )?
        } else {
            RecordBatch::try_new(schema.clone(), columns.into_iter().map(to_array).collect())?
        };
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            schema,
            None,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::{Hot, HotReading};
    use std::time::Duration;

    fn batch_of(ats: &[i64]) -> Vec<RecordBatch> {
        let hot = Hot::new(Duration::from_secs(1 << 40));
        let now = chrono::DateTime::from_timestamp_micros(4_000_000_000_000_000).unwrap();
        let readings = ats
            .iter()
            .map(|&at| HotReading {
                event_id: uuid::Uuid::new_v4(),
                device_id: "d".into(),
                at,
                ingested_at: at,
                seq: None,
                metrics: [None; 5],
            })
            .collect();
        hot.load(vec![], readings, now);
        hot.readings()
    }

    #[test]
    fn only_batches_outside_the_bounds_are_skipped() {
        let mut batches = batch_of(&[10, 20]);
        batches.extend(batch_of(&[30, 40]));
        assert_eq!(within(batches.clone(), i64::MIN, i64::MAX).len(), 2);
        assert_eq!(within(batches.clone(), 21, i64::MAX).len(), 1);
        assert_eq!(
            within(batches.clone(), 20, i64::MAX).len(),
            2,
            "an edge is kept"
        );
        assert_eq!(within(batches.clone(), i64::MIN, 29).len(), 1);
        assert_eq!(within(batches.clone(), 25, 26).len(), 0);
        assert_eq!(within(batches, 40, 40).len(), 1);
    }
}
