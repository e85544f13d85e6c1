//! The action router's rule predicates, e.g. `score > 0.8 and site == "plant-3"`.
//!
//! [`parse`] turns a rule's `when` text into an [`Expr`]; [`check`] type-checks it against
//! the fields an event has ([`Fields`], usually [`Fields::from_avro`] of the event type's
//! schema); [`eval`] decides it for one event given as JSON. An [`Expr`] prints (`Display`) in
//! a canonical form that parses back to the same expression, which the router records with
//! each action. The language is described in `docs/rules.md`.
//!
//! ```
//! use sluice_rules::{Fields, Type, check, eval, parse};
//!
//! let rule = parse(r#"score > 0.8 and site == 'plant-3'"#)?;
//! let fields = Fields::new()
//!     .with("score", Type::Number)
//!     .with("site", Type::nullable(Type::String));
//! check(&rule, &fields)?;
//! let event = serde_json::json!({"payload": {"score": 0.93, "site": "plant-3"}});
//! assert!(eval(&rule, &event)?);
//! assert_eq!(rule.to_string(), r#"score > 0.8 and site == "plant-3""#);
//! # Ok::<(), sluice_rules::Error>(())
//! ```
//!
//! This crate must never do I/O, and never panic or overflow the stack on hostile rule text:
//! rules are bounded by [`MAX_RULE_BYTES`] and [`MAX_DEPTH`]. Evaluating a predicate that
//! succeeds must not allocate.

mod ast;
mod eval;
mod lex;
mod parse;
mod suggest;
mod types;

use std::fmt;

pub use ast::{ArithOp, CmpOp, Expr, ExprKind, ListItem, Literal, Path};
pub use eval::eval;
pub use parse::parse;
pub use types::{Fields, Type, check};

/// The longest rule text [`parse`] accepts, in bytes.
pub const MAX_RULE_BYTES: usize = 4096;

/// The deepest an expression may nest: parentheses, `not`, unary minus and operators all
/// count. Bounds the recursion of parsing, checking, printing and evaluating.
pub const MAX_DEPTH: usize = 64;

/// Where in the rule text something is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// Byte offset from the start of the text.
    pub offset: usize,
    /// Line, from 1 (rules are usually one line).
    pub line: usize,
    /// Column within the line, in characters, from 1.
    pub column: usize,
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 1 {
            write!(f, "line {} column {}", self.line, self.column)
        } else {
            write!(f, "column {}", self.column)
        }
    }
}

/// What went wrong, as a small fixed set: use [`ErrorKind::as_str`] for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The text is not a predicate (a misplaced token, an unterminated string, ...).
    Syntax,
    /// The text is too long or nests too deeply.
    Limit,
    /// Operands of the wrong type, found by [`check`].
    Type,
    /// A field the event does not have, found by [`check`].
    UnknownField,
    /// The schema given to [`Fields::from_avro`] is not an Avro record.
    Schema,
    /// Division by zero while evaluating.
    DivisionByZero,
    /// A value of the wrong type met while evaluating (an event without a known schema).
    Runtime,
}

impl ErrorKind {
    /// A short reason code, e.g. `division_by_zero`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Syntax => "syntax",
            ErrorKind::Limit => "limit",
            ErrorKind::Type => "type",
            ErrorKind::UnknownField => "unknown_field",
            ErrorKind::Schema => "schema",
            ErrorKind::DivisionByZero => "division_by_zero",
            ErrorKind::Runtime => "runtime_type",
        }
    }
}

/// A problem with a rule, and where in its text it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}{}", .span.map(|s| format!(" at {s}")).unwrap_or_default())]
pub struct Error {
    /// What kind of problem.
    pub kind: ErrorKind,
    /// What is wrong and, when it can tell, what would be right.
    pub message: String,
    /// Where; `None` when the problem is not at one place (e.g. the text is too long).
    pub span: Option<Span>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>, span: Option<Span>) -> Error {
        Error {
            kind,
            message: message.into(),
            span,
        }
    }

    pub(crate) fn at(kind: ErrorKind, span: Span, message: impl Into<String>) -> Error {
        Error::new(kind, message, Some(span))
    }

    /// The 1-based column, when the error has a place.
    pub fn column(&self) -> Option<usize> {
        self.span.map(|s| s.column)
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
