//! What the SQL endpoint runs: queries only. Checked on the parsed statement, before any
//! planning, and again on the plan (no DDL, no DML, no statements), so a form the first check
//! misses is still refused.

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Set, Statement};

/// Session parameters clients set on connect; they change how results are formatted, never
/// what the engine may do.
const CLIENT_PARAMETERS: [&str; 8] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "extra_float_digits",
    "bytea_output",
    "intervalstyle",
    "client_min_messages",
    "timezone",
];

/// What a statement is, for the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A query (`SELECT`, `WITH`, `VALUES`, `EXPLAIN` of a query, `SHOW TABLES/COLUMNS`).
    Query,
    /// Session chatter a Postgres client sends (allowed client `SET`s, `SHOW`, `BEGIN`,
    /// `COMMIT`, `ROLLBACK`): answered without touching data.
    Session,
    /// Refused, with the reason.
    Refused(String),
}

fn refused(what: &str) -> Verdict {
    Verdict::Refused(format!(
        "the SQL endpoint is read-only: {what} is not allowed (only SELECT, WITH, VALUES, \
         EXPLAIN and SHOW)"
    ))
}

/// The verdict on one parsed statement.
pub fn check(statement: &Statement) -> Verdict {
    match statement {
        Statement::Query(q) => {
            if has_into(q) {
                return refused("SELECT INTO");
            }
            Verdict::Query
        }
        Statement::Explain { statement, .. } => match check(statement) {
            Verdict::Query => Verdict::Query,
            _ => refused("EXPLAIN of a statement that is not a query"),
        },
        Statement::ExplainTable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. } => Verdict::Query,
        Statement::ShowVariable { .. } | Statement::ShowVariables { .. } => Verdict::Session,
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => Verdict::Session,
        Statement::Set(set) => check_set(set),
        other => refused(&kind(other)),
    }
}

fn has_into(q: &datafusion::sql::sqlparser::ast::Query) -> bool {
    use datafusion::sql::sqlparser::ast::SetExpr;
    matches!(q.body.as_ref(), SetExpr::Select(s) if s.into.is_some())
}

fn check_set(set: &Set) -> Verdict {
    let names: Vec<String> = match set {
        Set::SingleAssignment { variable, .. } => vec![variable.to_string()],
        Set::SetTimeZone { .. } => vec!["timezone".to_owned()],
        Set::SetNames { .. } | Set::SetNamesDefault { .. } => vec!["client_encoding".to_owned()],
        Set::MultipleAssignments { assignments } => {
            assignments.iter().map(|a| a.name.to_string()).collect()
        }
        _ => return refused("this SET statement"),
    };
    for name in &names {
        let plain = name.trim_matches('"').to_ascii_lowercase();
        if !CLIENT_PARAMETERS.contains(&plain.as_str()) {
            return Verdict::Refused(format!(
                "the SQL endpoint's settings are fixed: SET {name} is not allowed (clients may \
                 set only {})",
                CLIENT_PARAMETERS.join(", ")
            ));
        }
    }
    Verdict::Session
}

/// The verdict on a statement of DataFusion's parser (which adds its own extensions).
pub fn check_df(statement: &DfStatement) -> Verdict {
    match statement {
        DfStatement::Statement(s) => check(s),
        DfStatement::Explain(e) => match check_df(&e.statement) {
            Verdict::Query => Verdict::Query,
            _ => refused("EXPLAIN of a statement that is not a query"),
        },
        DfStatement::CreateExternalTable(_) => refused("CREATE EXTERNAL TABLE"),
        DfStatement::CopyTo(_) => refused("COPY"),
        DfStatement::Reset(_) => refused("RESET"),
    }
}

/// The statement's leading keywords, for messages (`CREATE TABLE`, `DELETE`, ...).
fn kind(statement: &Statement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    let first = words.first().copied().unwrap_or("this statement");
    match first.to_ascii_uppercase().as_str() {
        "CREATE" | "DROP" | "ALTER" | "TRUNCATE" => {
            format!("{} {}", first, words.get(1).copied().unwrap_or(""))
                .trim()
                .to_ascii_uppercase()
        }
        w => w.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn verdict(sql: &str) -> Verdict {
        let mut statements = DFParser::parse_sql(sql).unwrap();
        check_df(&statements.pop_front().unwrap())
    }

    #[test]
    fn queries_pass_and_writes_do_not() {
        assert_eq!(verdict("SELECT 1"), Verdict::Query);
        assert_eq!(
            verdict("WITH a AS (SELECT 1) SELECT * FROM a"),
            Verdict::Query
        );
        assert_eq!(verdict("EXPLAIN SELECT 1"), Verdict::Query);
        assert!(
            matches!(verdict("DELETE FROM readings"), Verdict::Refused(m) if m.contains("DELETE"))
        );
        assert!(matches!(
            verdict("EXPLAIN DELETE FROM readings"),
            Verdict::Refused(_)
        ));
        assert!(
            matches!(verdict("DROP TABLE readings"), Verdict::Refused(m) if m.contains("DROP TABLE"))
        );
        assert!(matches!(
            verdict("SELECT * INTO t FROM readings"),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn only_client_parameters_may_be_set() {
        assert_eq!(verdict("SET extra_float_digits = 3"), Verdict::Session);
        assert_eq!(verdict("SET application_name = 'psql'"), Verdict::Session);
        assert!(matches!(
            verdict("SET datafusion.execution.batch_size = 1"),
            Verdict::Refused(_)
        ));
        assert!(matches!(
            verdict("SET statement_timeout = 0"),
            Verdict::Refused(_)
        ));
    }
}
