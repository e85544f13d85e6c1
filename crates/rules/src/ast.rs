//! The expression tree, and its canonical text form.

use std::fmt::{self, Write as _};

use crate::Span;

/// A parsed predicate or one of its sub-expressions.
///
/// Equality compares what the expressions mean, not where they were written: spans are
/// ignored, so `parse("a>1")` equals `parse("a > 1")`.
#[derive(Debug, Clone)]
pub struct Expr {
    /// What the expression is.
    pub kind: ExprKind,
    /// Where it is: the operator of an operation, else where the operand starts.
    pub span: Span,
}

impl PartialEq for Expr {
    fn eq(&self, other: &Expr) -> bool {
        self.kind == other.kind
    }
}

impl Expr {
    /// An expression at `span`.
    pub fn new(kind: ExprKind, span: Span) -> Expr {
        Expr { kind, span }
    }
}

/// The kinds of expression.
#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// `0.8`, `"plant-3"`, `true`, `null`.
    Literal(Literal),
    /// `score`, `payload.site`, `features["vibration_mm_s.z"]`.
    Field(Path),
    /// `not x`.
    Not(Box<Expr>),
    /// `-x`.
    Neg(Box<Expr>),
    /// `a and b and ...`: two or more operands, all written at one level.
    And(Vec<Expr>),
    /// `a or b or ...`: two or more operands, all written at one level.
    Or(Vec<Expr>),
    /// `a < b` and the other comparisons.
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    /// `a + b` and the other arithmetic.
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    /// `x in [...]`, or `x not in [...]` when `negated`.
    In {
        /// The value looked for.
        value: Box<Expr>,
        /// The literals it is looked for among; never empty and never `null`.
        list: Vec<ListItem>,
        /// `not in`.
        negated: bool,
    },
}

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// A number; rules do not tell integers from floats.
    Number(f64),
    /// A string.
    String(String),
    /// `true` or `false`.
    Bool(bool),
    /// `null`.
    Null,
}

/// A literal in an `in` list, with where it is. Equality ignores the span.
#[derive(Debug, Clone)]
pub struct ListItem {
    /// The value.
    pub value: Literal,
    /// Where it is written.
    pub span: Span,
}

impl PartialEq for ListItem {
    fn eq(&self, other: &ListItem) -> bool {
        self.value == other.value
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    /// Every comparison operator.
    pub const ALL: [CmpOp; 6] = [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
    ];

    /// How it is written, e.g. `<=`.
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    /// `==` or `!=`, which also take booleans and `null`.
    pub fn is_equality(self) -> bool {
        matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}

/// An arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArithOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
}

impl ArithOp {
    /// Every arithmetic operator.
    pub const ALL: [ArithOp; 4] = [ArithOp::Add, ArithOp::Sub, ArithOp::Mul, ArithOp::Div];

    /// How it is written, e.g. `*`.
    pub fn as_str(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
        }
    }
}

/// A field reference, split into its keys once at parse time: `features["a.b"]` is
/// `["features", "a.b"]`, and `payload.score` is `["payload", "score"]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Path {
    segments: Vec<String>,
}

impl Path {
    /// A path of these keys. The first must be an identifier that is not a keyword for the
    /// path to print as something [`crate::parse`] reads back.
    pub fn new<S: Into<String>>(segments: impl IntoIterator<Item = S>) -> Path {
        Path {
            segments: segments.into_iter().map(Into::into).collect(),
        }
    }

    /// The keys, outermost first.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_path(f, &self.segments)
    }
}

/// `a.b["c.d"]`: keys that are identifiers after a dot, others in brackets.
pub(crate) fn write_path(f: &mut impl fmt::Write, segments: &[String]) -> fmt::Result {
    for (i, segment) in segments.iter().enumerate() {
        if i == 0 {
            f.write_str(segment)?;
        } else if is_identifier(segment) {
            write!(f, ".{segment}")?;
        } else {
            f.write_char('[')?;
            write_string(f, segment)?;
            f.write_char(']')?;
        }
    }
    Ok(())
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The words that cannot name a top-level field.
pub(crate) const KEYWORDS: [&str; 7] = ["and", "or", "not", "in", "true", "false", "null"];

fn write_string(f: &mut impl fmt::Write, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            f.write_char('\\')?;
        }
        f.write_char(c)?;
    }
    f.write_char('"')
}

/// Integers as integers (`5`, not `5.0`); others in Rust's shortest round-trip form, which
/// uses an exponent for very large or small values (`1e-7`), so the text stays short.
fn write_number(f: &mut impl fmt::Write, n: f64) -> fmt::Result {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        // Exact: the value is an integer well inside i64.
        let i = n as i64;
        write!(f, "{i}")
    } else {
        write!(f, "{n:?}")
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Number(n) => write_number(f, *n),
            Literal::String(s) => write_string(f, s),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Null => f.write_str("null"),
        }
    }
}

/// Binding strength, weakest first; an operand that binds less than its place needs
/// parentheses.
fn precedence(kind: &ExprKind) -> u8 {
    match kind {
        ExprKind::Or(_) => 1,
        ExprKind::And(_) => 2,
        ExprKind::Not(_) => 3,
        ExprKind::Compare(..) | ExprKind::In { .. } => 4,
        ExprKind::Arith(ArithOp::Add | ArithOp::Sub, ..) => 5,
        ExprKind::Arith(ArithOp::Mul | ArithOp::Div, ..) => 6,
        ExprKind::Neg(_) => 7,
        ExprKind::Literal(_) | ExprKind::Field(_) => 8,
    }
}

fn write_expr(f: &mut fmt::Formatter<'_>, e: &Expr, min: u8) -> fmt::Result {
    if precedence(&e.kind) < min {
        f.write_char('(')?;
        write_expr(f, e, 0)?;
        return f.write_char(')');
    }
    let join = |f: &mut fmt::Formatter<'_>, items: &[Expr], sep: &str, min: u8| {
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                f.write_str(sep)?;
            }
            write_expr(f, item, min)?;
        }
        Ok(())
    };
    match &e.kind {
        ExprKind::Literal(l) => write!(f, "{l}"),
        ExprKind::Field(p) => write!(f, "{p}"),
        // Comparisons do not chain and `and`/`or` group only what is written at one level,
        // so a same-level operand is parenthesized.
        ExprKind::Or(items) => join(f, items, " or ", 2),
        ExprKind::And(items) => join(f, items, " and ", 3),
        ExprKind::Not(x) => {
            f.write_str("not ")?;
            write_expr(f, x, 3)
        }
        ExprKind::Neg(x) => {
            f.write_char('-')?;
            // `-5` reads back as the literal -5, so the negation of a literal 5 is `-(5)`.
            if matches!(x.kind, ExprKind::Literal(Literal::Number(_))) {
                write_expr(f, x, 9)
            } else {
                write_expr(f, x, 7)
            }
        }
        ExprKind::Compare(op, l, r) => {
            write_expr(f, l, 5)?;
            write!(f, " {} ", op.as_str())?;
            write_expr(f, r, 5)
        }
        ExprKind::Arith(op, l, r) => {
            let p = precedence(&e.kind);
            write_expr(f, l, p)?;
            write!(f, " {} ", op.as_str())?;
            write_expr(f, r, p + 1)
        }
        ExprKind::In {
            value,
            list,
            negated,
        } => {
            write_expr(f, value, 5)?;
            f.write_str(if *negated { " not in [" } else { " in [" })?;
            for (i, item) in list.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{}", item.value)?;
            }
            f.write_char(']')
        }
    }
}

/// The canonical form: single spaces around operators, double-quoted strings, parentheses
/// only where needed. It parses back to an equal expression.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_expr(f, self, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str) -> Expr {
        Expr::new(ExprKind::Field(Path::new([name])), Span::default())
    }

    fn num(n: f64) -> Expr {
        Expr::new(ExprKind::Literal(Literal::Number(n)), Span::default())
    }

    #[test]
    fn numbers_print_short() {
        let shown = |n: f64| Literal::Number(n).to_string();
        assert_eq!(shown(5.0), "5");
        assert_eq!(shown(-5.0), "-5");
        assert_eq!(shown(0.8), "0.8");
        assert_eq!(shown(1e-7), "1e-7");
        assert_eq!(shown(1e300), "1e300");
        assert_eq!(shown(-0.0), "0");
    }

    #[test]
    fn paths_print_brackets_only_when_needed() {
        let p = Path::new(["features", "vibration_mm_s.z", "x", "a \"b\""]);
        assert_eq!(
            p.to_string(),
            r#"features["vibration_mm_s.z"].x["a \"b\""]"#
        );
    }

    #[test]
    fn negated_literal_keeps_its_parentheses() {
        let e = Expr::new(ExprKind::Neg(Box::new(num(5.0))), Span::default());
        assert_eq!(e.to_string(), "-(5)");
        let e = Expr::new(ExprKind::Neg(Box::new(field("x"))), Span::default());
        assert_eq!(e.to_string(), "-x");
    }
}
