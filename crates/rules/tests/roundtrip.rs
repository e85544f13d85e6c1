//! The canonical form: every expression prints as text that parses back to it, and the
//! parser neither panics nor loops on token soup.

use proptest::collection::vec;
use proptest::prelude::*;
use sluice_rules::{ArithOp, CmpOp, Expr, ExprKind, ListItem, Literal, Path, Span, parse};

const KEYWORDS: [&str; 7] = ["and", "or", "not", "in", "true", "false", "null"];

fn expr(kind: ExprKind) -> Expr {
    Expr::new(kind, Span::default())
}

fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        (-1000i32..1000).prop_map(f64::from),
        any::<f64>().prop_filter("finite", |n| n.is_finite()),
    ]
}

/// A literal that may stand in an `in` list (no null).
fn list_literal() -> impl Strategy<Value = Literal> {
    prop_oneof![
        number().prop_map(Literal::Number),
        r#"[a-z "'\\.é-]{0,6}"#.prop_map(Literal::String),
        any::<bool>().prop_map(Literal::Bool),
    ]
}

fn path() -> impl Strategy<Value = Path> {
    let root =
        "[a-z_][a-z0-9_]{0,5}".prop_filter("not a keyword", |s| !KEYWORDS.contains(&s.as_str()));
    let key = prop_oneof![
        "[a-z_][a-z0-9_]{0,4}",
        r#"[a-z0-9_. "'\\]{0,4}"#,
        Just("in".to_owned())
    ];
    (root, vec(key, 0..3)).prop_map(|(root, keys)| Path::new(std::iter::once(root).chain(keys)))
}

fn arb_expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        list_literal().prop_map(|l| expr(ExprKind::Literal(l))),
        Just(expr(ExprKind::Literal(Literal::Null))),
        path().prop_map(|p| expr(ExprKind::Field(p))),
    ];
    leaf.prop_recursive(6, 64, 4, |inner| {
        let cmp = proptest::sample::select(CmpOp::ALL.to_vec());
        let arith = proptest::sample::select(ArithOp::ALL.to_vec());
        prop_oneof![
            inner.clone().prop_map(|x| expr(ExprKind::Not(Box::new(x)))),
            inner.clone().prop_map(|x| expr(ExprKind::Neg(Box::new(x)))),
            vec(inner.clone(), 2..4).prop_map(|xs| expr(ExprKind::And(xs))),
            vec(inner.clone(), 2..4).prop_map(|xs| expr(ExprKind::Or(xs))),
            (cmp, inner.clone(), inner.clone()).prop_map(|(op, l, r)| expr(ExprKind::Compare(
                op,
                Box::new(l),
                Box::new(r)
            ))),
            (arith, inner.clone(), inner.clone()).prop_map(|(op, l, r)| expr(ExprKind::Arith(
                op,
                Box::new(l),
                Box::new(r)
            ))),
            (inner, vec(list_literal(), 1..4), any::<bool>()).prop_map(|(x, list, negated)| {
                expr(ExprKind::In {
                    value: Box::new(x),
                    list: list
                        .into_iter()
                        .map(|value| ListItem {
                            value,
                            span: Span::default(),
                        })
                        .collect(),
                    negated,
                })
            }),
        ]
    })
}

fn token() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        "a",
        "b.c",
        "x[\"k.z\"]",
        "1",
        "-",
        "2.5",
        "1e3",
        "\"s\"",
        "'t'",
        "and",
        "or",
        "not",
        "in",
        "[",
        "]",
        ",",
        "(",
        ")",
        "==",
        "!=",
        "<",
        ">=",
        "+",
        "*",
        "/",
        "null",
        "true",
        ".",
        "=<",
        "\"",
        "é",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn display_parses_back(e in arb_expr()) {
        let text = e.to_string();
        let again = parse(&text).map_err(|err| TestCaseError::fail(format!("{text}: {err}")))?;
        prop_assert_eq!(&again, &e, "{}", text);
        // Canonical: printing again gives the same text.
        prop_assert_eq!(again.to_string(), text);
    }

    #[test]
    fn token_soup_parses_or_fails_cleanly(tokens in vec(token(), 0..40)) {
        let text = tokens.join(" ");
        if let Ok(e) = parse(&text) {
            let canonical = e.to_string();
            prop_assert_eq!(parse(&canonical).ok(), Some(e), "{} → {}", text, canonical);
        }
    }

    #[test]
    fn any_text_parses_or_fails_cleanly(text in "\\PC{0,80}") {
        let _ = parse(&text);
    }
}
