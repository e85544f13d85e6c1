//! Deciding a predicate for one event, without allocating unless it fails.

use std::cmp::Ordering;

use serde_json::Value;

use crate::ast::{ArithOp, CmpOp, Expr, ExprKind, Literal, Path};
use crate::{Error, ErrorKind, Result};

/// Decides `expr` for an event given as JSON: envelope fields (`event_type`,
/// `aggregate_id`, ...) at the top and the `payload` object inside.
///
/// A name is looked up in the payload first, then in the envelope (`score` is
/// `payload.score`; `event_type` is the envelope's), and `device` is `aggregate_id` unless
/// the payload has its own. Missing fields and nulls:
///
/// - `x == null` is true when `x` is missing or null, and `x != null` when it is neither;
/// - any other comparison, `in` and `not in` with a missing or null side is false — so
///   `site != "plant-3"` is false for an event without a site; write
///   `site == null or site != "plant-3"` to include those;
/// - arithmetic with a missing or null operand is missing (the comparison around it is false);
/// - a missing or null operand of `and`, `or` and `not` counts as false.
///
/// Values of different types are never equal and never ordered. Errors: division by zero,
/// and (for events whose schema was not checked) arithmetic or logic on a value of the wrong
/// type, or a predicate that is not true or false.
pub fn eval(expr: &Expr, event: &Value) -> Result<bool> {
    match value(expr, event)? {
        V::Bool(b) => Ok(b),
        V::Null => Ok(false),
        other => Err(runtime(
            expr,
            format!("the rule gave {} instead of true or false", other.a()),
        )),
    }
}

/// A value met while evaluating, borrowed from the rule or the event.
#[derive(Debug, Clone, Copy)]
enum V<'a> {
    Num(f64),
    Str(&'a str),
    Bool(bool),
    /// Null or missing.
    Null,
    /// A JSON object or array.
    Other,
}

impl V<'_> {
    fn a(self) -> &'static str {
        match self {
            V::Num(_) => "a number",
            V::Str(_) => "a string",
            V::Bool(_) => "true or false",
            V::Null => "null",
            V::Other => "an object or a list",
        }
    }
}

fn runtime(at: &Expr, message: String) -> Error {
    Error::at(ErrorKind::Runtime, at.span, message)
}

fn of_json(v: &Value) -> V<'_> {
    match v {
        Value::Null => V::Null,
        Value::Bool(b) => V::Bool(*b),
        Value::Number(n) => n.as_f64().map_or(V::Other, V::Num),
        Value::String(s) => V::Str(s),
        Value::Array(_) | Value::Object(_) => V::Other,
    }
}

fn of_literal(l: &Literal) -> V<'_> {
    match l {
        Literal::Number(n) => V::Num(*n),
        Literal::String(s) => V::Str(s),
        Literal::Bool(b) => V::Bool(*b),
        Literal::Null => V::Null,
    }
}

fn walk<'a>(mut v: &'a Value, keys: &[String]) -> Option<&'a Value> {
    for key in keys {
        v = v.as_object()?.get(key.as_str())?;
    }
    Some(v)
}

/// Payload first, then envelope, then `device` as `aggregate_id`.
fn lookup<'a>(event: &'a Value, path: &Path) -> Option<&'a Value> {
    let keys = path.segments();
    if keys.is_empty() {
        return None;
    }
    if let Some(v) = event.get("payload").and_then(|p| walk(p, keys)) {
        return Some(v);
    }
    if let Some(v) = walk(event, keys) {
        return Some(v);
    }
    if keys[0] == "device" {
        return walk(event.get("aggregate_id")?, &keys[1..]);
    }
    None
}

/// True or false for `and`, `or` and `not`; missing and null count as false.
fn truth(e: &Expr, event: &Value, op: &str) -> Result<bool> {
    match value(e, event)? {
        V::Bool(b) => Ok(b),
        V::Null => Ok(false),
        other => Err(runtime(
            e,
            format!("\"{op}\" needs true or false, but {e} is {}", other.a()),
        )),
    }
}

/// A number for arithmetic; `None` for missing and null.
fn number(e: &Expr, event: &Value, op: &str) -> Result<Option<f64>> {
    match value(e, event)? {
        V::Num(n) => Ok(Some(n)),
        V::Null => Ok(None),
        other => Err(runtime(
            e,
            format!("\"{op}\" needs numbers, but {e} is {}", other.a()),
        )),
    }
}

fn compare(op: CmpOp, a: V<'_>, b: V<'_>) -> bool {
    let ordering = match (a, b) {
        (V::Num(x), V::Num(y)) => x.partial_cmp(&y),
        (V::Str(x), V::Str(y)) => Some(x.cmp(y)),
        (V::Bool(x), V::Bool(y)) if op.is_equality() => Some(x.cmp(&y)),
        _ => None,
    };
    // NaN (from arithmetic on huge values) and values that cannot be compared: false.
    let Some(ordering) = ordering else {
        return false;
    };
    match op {
        CmpOp::Eq => ordering == Ordering::Equal,
        CmpOp::Ne => ordering != Ordering::Equal,
        CmpOp::Lt => ordering == Ordering::Less,
        CmpOp::Le => ordering != Ordering::Greater,
        CmpOp::Gt => ordering == Ordering::Greater,
        CmpOp::Ge => ordering != Ordering::Less,
    }
}

fn value<'a>(e: &'a Expr, event: &'a Value) -> Result<V<'a>> {
    Ok(match &e.kind {
        ExprKind::Literal(l) => of_literal(l),
        ExprKind::Field(path) => lookup(event, path).map_or(V::Null, of_json),
        ExprKind::Not(x) => V::Bool(!truth(x, event, "not")?),
        ExprKind::And(items) => {
            for item in items {
                if !truth(item, event, "and")? {
                    return Ok(V::Bool(false));
                }
            }
            V::Bool(true)
        }
        ExprKind::Or(items) => {
            for item in items {
                if truth(item, event, "or")? {
                    return Ok(V::Bool(true));
                }
            }
            V::Bool(false)
        }
        ExprKind::Neg(x) => number(x, event, "-")?.map_or(V::Null, |n| V::Num(-n)),
        ExprKind::Arith(op, l, r) => {
            let (a, b) = (
                number(l, event, op.as_str())?,
                number(r, event, op.as_str())?,
            );
            let (Some(a), Some(b)) = (a, b) else {
                return Ok(V::Null);
            };
            V::Num(match op {
                ArithOp::Add => a + b,
                ArithOp::Sub => a - b,
                ArithOp::Mul => a * b,
                ArithOp::Div if b == 0.0 => {
                    return Err(Error::at(
                        ErrorKind::DivisionByZero,
                        e.span,
                        format!("division by zero: {r} is 0"),
                    ));
                }
                ArithOp::Div => a / b,
            })
        }
        ExprKind::Compare(op, l, r) => {
            let (a, b) = (value(l, event)?, value(r, event)?);
            let null_test = matches!(l.kind, ExprKind::Literal(Literal::Null))
                || matches!(r.kind, ExprKind::Literal(Literal::Null));
            if null_test {
                let both_null = matches!((a, b), (V::Null, V::Null));
                V::Bool(match op {
                    CmpOp::Eq => both_null,
                    CmpOp::Ne => !both_null,
                    _ => false,
                })
            } else {
                V::Bool(compare(*op, a, b))
            }
        }
        ExprKind::In {
            value: x,
            list,
            negated,
        } => match value(x, event)? {
            V::Null | V::Other => V::Bool(false),
            v => {
                let found = list
                    .iter()
                    .any(|item| compare(CmpOp::Eq, v, of_literal(&item.value)));
                V::Bool(found != *negated)
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::parse;

    fn event(payload: Value) -> Value {
        json!({
            "event_id": "7d1d4a4e-0000-4000-8000-000000000001",
            "event_type": "inference.result",
            "aggregate_id": "dev-1",
            "payload": payload,
        })
    }

    fn full() -> Value {
        event(json!({
            "score": 0.9,
            "label": "anomaly",
            "site": "plant-3",
            "flag": true,
            "temperature_c": 25,
            "nothing": null,
            "features": {"vibration_mm_s.z": 6.5, "x": 1, "nested": {"a.b": 2}},
        }))
    }

    fn run(rule: &str, event: &Value) -> Result<bool> {
        eval(
            &parse(rule).unwrap_or_else(|e| panic!("{rule}: {e}")),
            event,
        )
    }

    /// Each rule against the full event, one without `site` and one with `site: null`.
    #[track_caller]
    fn table(cases: &[(&str, [bool; 3])]) {
        let missing = event(json!({"score": 0.9}));
        let null = event(json!({"score": 0.9, "site": null}));
        for (rule, want) in cases {
            let got = [&full(), &missing, &null].map(|e| run(rule, e).expect(rule));
            assert_eq!(&got, want, "{rule} on [full, missing site, null site]");
        }
    }

    #[test]
    fn null_and_missing() {
        table(&[
            ("site == 'plant-3'", [true, false, false]),
            ("site != 'plant-3'", [false, false, false]),
            ("site != 'plant-1'", [true, false, false]),
            ("not (site == 'plant-3')", [false, true, true]),
            ("site == null", [false, true, true]),
            ("null == site", [false, true, true]),
            ("site != null", [true, false, false]),
            ("site == null or site != 'plant-3'", [false, true, true]),
            ("site < 'plant-4'", [true, false, false]),
            ("site >= 'plant-4'", [false, false, false]),
            ("site in ['plant-1', 'plant-3']", [true, false, false]),
            ("site not in ['plant-1', 'plant-3']", [false, false, false]),
            ("site not in ['plant-1']", [true, false, false]),
            ("not (site in ['plant-1'])", [true, true, true]),
            ("flag", [true, false, false]),
            ("not flag", [false, true, true]),
            ("flag and score > 0.5", [true, false, false]),
            ("flag or score > 0.5", [true, true, true]),
            ("null == null", [true, true, true]),
            ("nothing == null and missing == null", [true, true, true]),
            ("features.missing > 0", [false, false, false]),
            ("features.missing == null", [true, true, true]),
        ]);
    }

    #[test]
    fn comparisons_and_arithmetic() {
        table(&[
            ("score > 0.8 and site == \"plant-3\"", [true, false, false]),
            ("score > 0.9", [false, false, false]),
            (
                "score >= 0.9 and score <= 0.9 and score == 0.9",
                [true, true, true],
            ),
            ("(temperature_c - 20) * 2 >= 10", [true, false, false]),
            ("(temperature_c - 20) * 2 > 10", [false, false, false]),
            (
                "temperature_c / 5 == 5 and -temperature_c == -25",
                [true, false, false],
            ),
            (
                "1 + 2 * 3 == 7 and (1 + 2) * 3 == 9 and 7 - 2 - 1 == 4",
                [true, true, true],
            ),
            ("temperature_c == 25.0", [true, false, false]),
            ("label == 'anomaly'", [true, false, false]),
            ("label == 'Anomaly'", [false, false, false]),
            ("label in ['normal', 'anomaly']", [true, false, false]),
            ("score in [0.9, 1]", [true, true, true]),
            ("score not in [0.1, -2]", [true, true, true]),
            ("flag == true and flag != false", [true, false, false]),
            ("flag in [true]", [true, false, false]),
            // Different types are never equal, nor unequal.
            ("score == '0.9'", [false, false, false]),
            ("score != '0.9'", [false, false, false]),
            ("features == 1 or features != 1", [false, false, false]),
        ]);
    }

    #[test]
    fn fields_resolve_payload_first_then_envelope() {
        table(&[
            ("features[\"vibration_mm_s.z\"] > 5", [true, false, false]),
            (
                "features.x == 1 and features.nested[\"a.b\"] == 2",
                [true, false, false],
            ),
            ("payload.score == score", [true, true, true]),
            (
                "event_type == 'inference.result' and device == 'dev-1'",
                [true, true, true],
            ),
            ("aggregate_id == device", [true, true, true]),
            ("payload.event_type == null", [true, true, true]),
        ]);
        let shadowed = event(json!({"event_type": "mine", "device": "sensor-9"}));
        assert_eq!(run("event_type == 'mine'", &shadowed), Ok(true));
        assert_eq!(run("device == 'sensor-9'", &shadowed), Ok(true));
        assert_eq!(run("aggregate_id == 'dev-1'", &shadowed), Ok(true));
    }

    #[test]
    fn errors() {
        let e = run("score / (temperature_c - 25) > 1", &full()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DivisionByZero);
        assert_eq!(
            e.to_string(),
            "division by zero: temperature_c - 25 is 0 at column 7"
        );
        // A missing divisor makes the quotient missing, not an error.
        assert_eq!(run("score / nope > 1", &full()), Ok(false));
        // `and` and `or` stop at the first operand that decides.
        assert_eq!(run("score < 0 and 1 / 0 > 1", &full()), Ok(false));
        assert_eq!(run("score > 0 or 1 / 0 > 1", &full()), Ok(true));

        let cases = [
            (
                "site + 1 > 0",
                "\"+\" needs numbers, but site is a string at column 1",
            ),
            (
                "-label < 0",
                "\"-\" needs numbers, but label is a string at column 2",
            ),
            (
                "site and flag",
                "\"and\" needs true or false, but site is a string at column 1",
            ),
            (
                "not features",
                "\"not\" needs true or false, but features is an object or a list at column 5",
            ),
            (
                "score",
                "the rule gave a number instead of true or false at column 1",
            ),
        ];
        for (rule, want) in cases {
            let e = run(rule, &full()).unwrap_err();
            assert_eq!(
                (e.kind, e.to_string()),
                (ErrorKind::Runtime, want.to_owned()),
                "{rule}"
            );
        }
        // Missing is not an error, even where a bool is needed.
        assert_eq!(run("missing", &full()), Ok(false));
    }

    #[test]
    fn events_of_any_shape() {
        assert_eq!(run("a == 1", &json!(null)), Ok(false));
        assert_eq!(run("a == null", &json!([1, 2])), Ok(true));
        assert_eq!(run("a == 1", &json!({"payload": 5, "a": 1})), Ok(true));
        assert_eq!(
            run("big * big * 1e300 > 1", &json!({"big": 1e300})),
            Ok(true)
        );
        // inf - inf is NaN, which compares as nothing.
        let nan = "big * big * 1e300 - big * big * 1e300";
        assert_eq!(
            run(&format!("{nan} == 0 or {nan} != 0"), &json!({"big": 1e300})),
            Ok(false)
        );
    }
}
