//! Recursive descent from tokens to an [`Expr`].
//!
//! ```text
//! or      := and ("or" and)*
//! and     := not ("and" not)*
//! not     := "not" not | compare
//! compare := sum (cmp_op sum | "in" list | "not" "in" list)?
//! sum     := product (("+" | "-") product)*
//! product := unary (("*" | "/") unary)*
//! unary   := "-" unary | primary
//! primary := number | string | "true" | "false" | "null" | field | "(" or ")"
//! field   := ident ("." name | "[" string "]")*
//! list    := "[" literal ("," literal)* ","? "]"
//! ```

use crate::ast::{ArithOp, Expr, ExprKind, KEYWORDS, ListItem, Literal, Path};
use crate::lex::{Lexer, Tok, Token};
use crate::suggest::did_you_mean;
use crate::{Error, ErrorKind, MAX_DEPTH, MAX_RULE_BYTES, Result, Span};

/// Parses a rule predicate, e.g. `score > 0.8 and site == "plant-3"`.
///
/// Reports the first mistake, with where it is. Text longer than [`MAX_RULE_BYTES`] or
/// nesting deeper than [`MAX_DEPTH`] is refused.
pub fn parse(text: &str) -> Result<Expr> {
    if text.len() > MAX_RULE_BYTES {
        return Err(Error::new(
            ErrorKind::Limit,
            format!(
                "the rule is {} bytes long; the most a rule may be is {MAX_RULE_BYTES}",
                text.len()
            ),
            None,
        ));
    }
    let mut lex = Lexer::new(text);
    let first = lex.next_token()?;
    if first.tok == Tok::Eof {
        return Err(syntax(first.span, "the rule is empty"));
    }
    let mut p = Parser {
        lex,
        tok: first,
        prev: None,
        nesting: 0,
    };
    let (expr, _) = p.or()?;
    if p.tok.tok != Tok::Eof {
        return Err(p.trailing());
    }
    Ok(expr)
}

fn syntax(span: Span, message: impl Into<String>) -> Error {
    Error::at(ErrorKind::Syntax, span, message)
}

fn too_deep(span: Span) -> Error {
    Error::at(
        ErrorKind::Limit,
        span,
        format!("the rule nests more than {MAX_DEPTH} levels deep"),
    )
}

/// A parsed sub-expression and the depth of its tree.
type Node = (Expr, usize);

struct Parser<'a> {
    lex: Lexer<'a>,
    /// The next token, not yet consumed.
    tok: Token<'a>,
    /// The last token consumed, for "after ..." in messages.
    prev: Option<&'a str>,
    /// Open parentheses, `not`s and unary minuses: bounds the parser's own recursion.
    nesting: usize,
}

impl<'a> Parser<'a> {
    fn advance(&mut self) -> Result<Token<'a>> {
        let next = self.lex.next_token()?;
        let current = std::mem::replace(&mut self.tok, next);
        self.prev = Some(current.text);
        Ok(current)
    }

    fn node(kind: ExprKind, span: Span, depth: usize) -> Result<Node> {
        if depth > MAX_DEPTH {
            return Err(too_deep(span));
        }
        Ok((Expr::new(kind, span), depth))
    }

    fn enter(&mut self, span: Span) -> Result<()> {
        self.nesting += 1;
        if self.nesting > MAX_DEPTH {
            return Err(too_deep(span));
        }
        Ok(())
    }

    /// `found "x"`, or `found the end of the rule`.
    fn found(&self) -> String {
        if self.tok.tok == Tok::Eof {
            "found the end of the rule".to_owned()
        } else {
            format!("found \"{}\"", self.tok.text)
        }
    }

    fn or(&mut self) -> Result<Node> {
        self.chain(Tok::Or, Parser::and, ExprKind::Or)
    }

    fn and(&mut self) -> Result<Node> {
        self.chain(Tok::And, Parser::not, ExprKind::And)
    }

    /// `x op x op ...` as one node with every operand, or just `x`.
    fn chain(
        &mut self,
        op: Tok,
        operand: fn(&mut Parser<'a>) -> Result<Node>,
        make: fn(Vec<Expr>) -> ExprKind,
    ) -> Result<Node> {
        let (first, mut depth) = operand(self)?;
        if self.tok.tok != op {
            return Ok((first, depth));
        }
        let span = self.tok.span;
        let mut items = vec![first];
        while self.tok.tok == op {
            self.advance()?;
            let (item, d) = operand(self)?;
            depth = depth.max(d);
            items.push(item);
        }
        Parser::node(make(items), span, depth + 1)
    }

    fn not(&mut self) -> Result<Node> {
        if self.tok.tok != Tok::Not {
            return self.compare();
        }
        let span = self.advance()?.span;
        self.enter(span)?;
        let (inner, depth) = self.not()?;
        self.nesting -= 1;
        Parser::node(ExprKind::Not(Box::new(inner)), span, depth + 1)
    }

    fn compare(&mut self) -> Result<Node> {
        let (lhs, ld) = self.sum()?;
        let node = match self.tok.tok {
            Tok::Cmp(op) => {
                let span = self.advance()?.span;
                let (rhs, rd) = self.sum()?;
                let kind = ExprKind::Compare(op, Box::new(lhs), Box::new(rhs));
                Parser::node(kind, span, ld.max(rd) + 1)?
            }
            Tok::In | Tok::Not => {
                let negated = self.tok.tok == Tok::Not;
                let span = self.advance()?.span;
                if negated {
                    if self.tok.tok != Tok::In {
                        return Err(syntax(
                            self.tok.span,
                            format!(
                                "expected \"in\" after \"not\" (as in `x not in [1, 2]`), {}",
                                self.found()
                            ),
                        ));
                    }
                    self.advance()?;
                }
                let list = self.list()?;
                let kind = ExprKind::In {
                    value: Box::new(lhs),
                    list,
                    negated,
                };
                Parser::node(kind, span, ld + 1)?
            }
            _ => return Ok((lhs, ld)),
        };
        if matches!(self.tok.tok, Tok::Cmp(_) | Tok::In) {
            return Err(syntax(
                self.tok.span,
                format!(
                    "comparisons do not chain; join them with \"and\" (as in `0 < x and x < 5`), \
                     {}",
                    self.found()
                ),
            ));
        }
        Ok(node)
    }

    fn sum(&mut self) -> Result<Node> {
        self.arith(
            |t| match t {
                Tok::Plus => Some(ArithOp::Add),
                Tok::Minus => Some(ArithOp::Sub),
                _ => None,
            },
            Parser::product,
        )
    }

    fn product(&mut self) -> Result<Node> {
        self.arith(
            |t| match t {
                Tok::Star => Some(ArithOp::Mul),
                Tok::Slash => Some(ArithOp::Div),
                _ => None,
            },
            Parser::unary,
        )
    }

    /// Left-associative: `a - b - c` is `(a - b) - c`.
    fn arith(
        &mut self,
        op_of: fn(&Tok) -> Option<ArithOp>,
        operand: fn(&mut Parser<'a>) -> Result<Node>,
    ) -> Result<Node> {
        let (mut lhs, mut depth) = operand(self)?;
        while let Some(op) = op_of(&self.tok.tok) {
            let span = self.advance()?.span;
            let (rhs, rd) = operand(self)?;
            let kind = ExprKind::Arith(op, Box::new(lhs), Box::new(rhs));
            (lhs, depth) = Parser::node(kind, span, depth.max(rd) + 1)?;
        }
        Ok((lhs, depth))
    }

    fn unary(&mut self) -> Result<Node> {
        if self.tok.tok != Tok::Minus {
            return self.primary();
        }
        let span = self.advance()?.span;
        // `-5` is the literal -5, so that a negative number reads as one value.
        if let Tok::Number(n) = self.tok.tok {
            self.advance()?;
            return Ok((Expr::new(ExprKind::Literal(Literal::Number(-n)), span), 1));
        }
        self.enter(span)?;
        let (inner, depth) = self.unary()?;
        self.nesting -= 1;
        Parser::node(ExprKind::Neg(Box::new(inner)), span, depth + 1)
    }

    fn primary(&mut self) -> Result<Node> {
        let span = self.tok.span;
        let literal = match &self.tok.tok {
            Tok::Number(n) => Literal::Number(*n),
            Tok::Str(s) => Literal::String(s.clone()),
            Tok::True => Literal::Bool(true),
            Tok::False => Literal::Bool(false),
            Tok::Null => Literal::Null,
            Tok::Ident => return self.field(),
            Tok::LParen => {
                self.advance()?;
                self.enter(span)?;
                let inner = self.or()?;
                self.nesting -= 1;
                if self.tok.tok != Tok::RParen {
                    return Err(syntax(
                        self.tok.span,
                        format!(
                            "expected \")\" to close the \"(\" at {span}, {}",
                            self.found()
                        ),
                    ));
                }
                self.advance()?;
                return Ok(inner);
            }
            _ => return Err(self.expected_operand()),
        };
        self.advance()?;
        Ok((Expr::new(ExprKind::Literal(literal), span), 1))
    }

    fn expected_operand(&self) -> Error {
        let after = self
            .prev
            .map(|p| format!(" after \"{p}\""))
            .unwrap_or_default();
        let found = if self.tok.tok == Tok::Eof {
            String::new()
        } else {
            format!(", {}", self.found())
        };
        syntax(self.tok.span, format!("expected an operand{after}{found}"))
    }

    fn field(&mut self) -> Result<Node> {
        let start = self.advance()?;
        let mut segments = vec![start.text.to_owned()];
        loop {
            match self.tok.tok {
                Tok::Dot => {
                    self.advance()?;
                    // After a dot keywords are names too: `payload.in` is fine.
                    let named = matches!(
                        self.tok.tok,
                        Tok::Ident
                            | Tok::And
                            | Tok::Or
                            | Tok::Not
                            | Tok::In
                            | Tok::True
                            | Tok::False
                            | Tok::Null
                    );
                    if !named {
                        return Err(syntax(
                            self.tok.span,
                            format!(
                                "expected a field name after \".\" (write keys that are not \
                                 names as [\"key\"]), {}",
                                self.found()
                            ),
                        ));
                    }
                    segments.push(self.advance()?.text.to_owned());
                }
                Tok::LBracket => {
                    let open = self.advance()?.span;
                    let Tok::Str(key) = &self.tok.tok else {
                        return Err(syntax(
                            self.tok.span,
                            format!(
                                "expected a quoted key after \"[\" (as in \
                                 `features[\"vibration.z\"]`), {}",
                                self.found()
                            ),
                        ));
                    };
                    segments.push(key.clone());
                    self.advance()?;
                    if self.tok.tok != Tok::RBracket {
                        return Err(syntax(
                            self.tok.span,
                            format!(
                                "expected \"]\" to close the \"[\" at {open}, {}",
                                self.found()
                            ),
                        ));
                    }
                    self.advance()?;
                }
                _ => break,
            }
        }
        Ok((
            Expr::new(ExprKind::Field(Path::new(segments)), start.span),
            1,
        ))
    }

    /// `["a", "b"]` after `in`.
    fn list(&mut self) -> Result<Vec<ListItem>> {
        let keyword = self.prev.unwrap_or("in");
        if self.tok.tok != Tok::LBracket {
            return Err(syntax(
                self.tok.span,
                format!(
                    "expected a list after \"{keyword}\" (as in `site in [\"plant-1\", \
                     \"plant-2\"]`), {}",
                    self.found()
                ),
            ));
        }
        let open = self.advance()?.span;
        let mut items = Vec::new();
        loop {
            let span = self.tok.span;
            let value = match &self.tok.tok {
                Tok::Number(n) => Literal::Number(*n),
                Tok::Str(s) => Literal::String(s.clone()),
                Tok::True => Literal::Bool(true),
                Tok::False => Literal::Bool(false),
                Tok::Minus => {
                    self.advance()?;
                    let Tok::Number(n) = self.tok.tok else {
                        return Err(syntax(
                            self.tok.span,
                            format!("expected a number after \"-\", {}", self.found()),
                        ));
                    };
                    Literal::Number(-n)
                }
                Tok::Null => {
                    return Err(syntax(
                        span,
                        "null cannot be in a list; test it apart (as in `x == null or x in \
                         [1, 2]`)",
                    ));
                }
                Tok::RBracket if items.is_empty() => {
                    return Err(syntax(span, "the list is empty, so nothing is in it"));
                }
                _ => {
                    return Err(syntax(
                        span,
                        format!(
                            "a list holds only numbers, strings, true and false, {}",
                            self.found()
                        ),
                    ));
                }
            };
            self.advance()?;
            items.push(ListItem { value, span });
            match self.tok.tok {
                Tok::Comma => {
                    self.advance()?;
                    if self.tok.tok == Tok::RBracket {
                        self.advance()?;
                        return Ok(items);
                    }
                }
                Tok::RBracket => {
                    self.advance()?;
                    return Ok(items);
                }
                _ => {
                    return Err(syntax(
                        self.tok.span,
                        format!(
                            "expected \",\" or \"]\" to close the list at {open}, {}",
                            self.found()
                        ),
                    ));
                }
            }
        }
    }

    /// A token after a complete expression.
    fn trailing(&self) -> Error {
        let text = self.tok.text;
        let message = match &self.tok.tok {
            Tok::RParen => "unmatched \")\"".to_owned(),
            Tok::Ident => {
                let lower = text.to_ascii_lowercase();
                let hint = if KEYWORDS.contains(&lower.as_str()) {
                    format!("; did you mean \"{lower}\"? (keywords are lower case)")
                } else {
                    did_you_mean(text, ["and", "or", "not", "in"])
                        .map(|k| format!("; did you mean \"{k}\"?"))
                        .unwrap_or_default()
                };
                format!(
                    "expected an operator (\"and\", \"or\", a comparison, ...) or the end of \
                     the rule, found \"{text}\"{hint}"
                )
            }
            _ => format!(
                "expected an operator (\"and\", \"or\", a comparison, ...) or the end of the \
                 rule, {}",
                self.found()
            ),
        };
        syntax(self.tok.span, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::CmpOp;

    /// The tree, fully parenthesized, to show how the text was grouped.
    fn tree(e: &Expr) -> String {
        let all = |items: &[Expr]| items.iter().map(tree).collect::<Vec<_>>().join(" ");
        match &e.kind {
            ExprKind::Literal(l) => l.to_string(),
            ExprKind::Field(p) => p.to_string(),
            ExprKind::Not(x) => format!("(not {})", tree(x)),
            ExprKind::Neg(x) => format!("(neg {})", tree(x)),
            ExprKind::And(items) => format!("(and {})", all(items)),
            ExprKind::Or(items) => format!("(or {})", all(items)),
            ExprKind::Compare(op, l, r) => format!("({} {} {})", op.as_str(), tree(l), tree(r)),
            ExprKind::Arith(op, l, r) => format!("({} {} {})", op.as_str(), tree(l), tree(r)),
            ExprKind::In {
                value,
                list,
                negated,
            } => {
                let items: Vec<String> = list.iter().map(|i| i.value.to_string()).collect();
                let op = if *negated { "not-in" } else { "in" };
                format!("({op} {} [{}])", tree(value), items.join(" "))
            }
        }
    }

    fn parsed(text: &str) -> String {
        tree(&parse(text).unwrap_or_else(|e| panic!("{text}: {e}")))
    }

    fn error(text: &str) -> String {
        parse(text)
            .map(|e| panic!("{text} parsed as {e}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn precedence() {
        let cases = [
            ("a or b and c", "(or a (and b c))"),
            ("a and b or c and d", "(or (and a b) (and c d))"),
            ("a and b and c", "(and a b c)"),
            ("(a and b) and c", "(and (and a b) c)"),
            ("not a and b", "(and (not a) b)"),
            ("not a == 1", "(not (== a 1))"),
            ("not not a", "(not (not a))"),
            ("a + b * c - d", "(- (+ a (* b c)) d)"),
            ("a - b - c", "(- (- a b) c)"),
            ("a / b / c", "(/ (/ a b) c)"),
            ("a - (b - c)", "(- a (- b c))"),
            (
                "(temperature_c - 20) * 2 >= 10",
                "(>= (* (- temperature_c 20) 2) 10)",
            ),
            ("-x * 2", "(* (neg x) 2)"),
            ("-2 * x", "(* -2 x)"),
            ("2 - -1", "(- 2 -1)"),
            ("- -x", "(neg (neg x))"),
            ("-(3)", "(neg 3)"),
            ("x not in [1, -2, 3,]", "(not-in x [1 -2 3])"),
            ("not x in [\"a\"]", "(not (in x [\"a\"]))"),
            ("a + 1 in [2, 3]", "(in (+ a 1) [2 3])"),
            ("1e-7 < 2.5E3", "(< 1e-7 2500)"),
            ("x == null", "(== x null)"),
            (
                "flag == true or flag == false",
                "(or (== flag true) (== flag false))",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parsed(text), want, "{text}");
        }
    }

    #[test]
    fn the_brief_examples() {
        assert_eq!(
            parsed("score > 0.8 and site == \"plant-3\""),
            "(and (> score 0.8) (== site \"plant-3\"))"
        );
        assert_eq!(parsed("status == 'offline'"), "(== status \"offline\")");
        assert_eq!(
            parsed(
                "features[\"vibration_mm_s.z\"] > 5 or not (site in [\"plant-1\", \"plant-2\"])"
            ),
            "(or (> features[\"vibration_mm_s.z\"] 5) (not (in site [\"plant-1\" \"plant-2\"])))"
        );
    }

    #[test]
    fn fields_and_strings() {
        let e = parse(r#"payload.in["a.b"].x == 'it\'s "q" \\'"#).expect("parses");
        let ExprKind::Compare(CmpOp::Eq, l, r) = &e.kind else {
            panic!("{e:?}");
        };
        let ExprKind::Field(path) = &l.kind else {
            panic!("{l:?}");
        };
        assert_eq!(path.segments(), ["payload", "in", "a.b", "x"]);
        assert_eq!(
            r.kind,
            ExprKind::Literal(Literal::String(r#"it's "q" \"#.to_owned()))
        );
        // The same key written either way is the same path.
        assert_eq!(parse("a.b > 1"), parse("a[\"b\"] > 1"));
        assert_eq!(parse("a>1"), parse("  a  >\n 1 "));
    }

    #[test]
    fn spans_point_at_operators_and_operands() {
        let e = parse("score > 0.8 and site == 'x'").expect("parses");
        assert_eq!(e.span.column, 13);
        let ExprKind::And(items) = &e.kind else {
            panic!()
        };
        assert_eq!(items[0].span.column, 7);
        assert_eq!(items[1].span.column, 22);
        let ExprKind::Compare(_, l, r) = &items[1].kind else {
            panic!()
        };
        assert_eq!((l.span.column, r.span.column), (17, 25));
    }

    #[test]
    fn errors_say_what_and_where() {
        let cases = [
            (
                "score > 0.8 and",
                "expected an operand after \"and\" at column 16",
            ),
            (
                "score > 0.8 and )",
                "expected an operand after \"and\", found \")\" at column 17",
            ),
            ("site == \"plant-3", "unterminated string at column 9"),
            ("site == 'a\\'", "unterminated string at column 9"),
            (
                "a =< 1",
                "unknown operator \"=<\"; did you mean \"<=\"? at column 3",
            ),
            (
                "a => 1",
                "unknown operator \"=>\"; did you mean \">=\"? at column 3",
            ),
            (
                "a = 1",
                "unknown operator \"=\"; did you mean \"==\"? at column 3",
            ),
            (
                "a <> 1",
                "unknown operator \"<>\"; did you mean \"!=\"? at column 3",
            ),
            (
                "a && b",
                "unknown operator \"&&\"; did you mean \"and\"? at column 3",
            ),
            (
                "a || b",
                "unknown operator \"||\"; did you mean \"or\"? at column 3",
            ),
            (
                "!a",
                "unknown operator \"!\"; did you mean \"not\"? at column 1",
            ),
            ("a <=> b", "unknown operator \"<=>\" at column 3"),
            (
                "a == \"x\\n\"",
                "unknown escape \"\\n\" in a string (only \\\", \\' and \\\\ are escapes) at \
                 column 8",
            ),
            ("a # b", "unexpected character '#' at column 3"),
            (
                "(a > 1",
                "expected \")\" to close the \"(\" at column 1, found the end of the rule at \
                 column 7",
            ),
            ("a > 1)", "unmatched \")\" at column 6"),
            (
                "0 < a < 5",
                "comparisons do not chain; join them with \"and\" (as in `0 < x and x < 5`), \
                 found \"<\" at column 7",
            ),
            (
                "a in 1",
                "expected a list after \"in\" (as in `site in [\"plant-1\", \"plant-2\"]`), \
                 found \"1\" at column 6",
            ),
            (
                "a in []",
                "the list is empty, so nothing is in it at column 7",
            ),
            (
                "a in [1, null]",
                "null cannot be in a list; test it apart (as in `x == null or x in [1, 2]`) \
                 at column 10",
            ),
            (
                "a in [b]",
                "a list holds only numbers, strings, true and false, found \"b\" at column 7",
            ),
            (
                "a in [1 2]",
                "expected \",\" or \"]\" to close the list at column 6, found \"2\" at column 9",
            ),
            (
                "a not b",
                "expected \"in\" after \"not\" (as in `x not in [1, 2]`), found \"b\" at column 7",
            ),
            (
                "a. > 1",
                "expected a field name after \".\" (write keys that are not names as \
                 [\"key\"]), found \">\" at column 4",
            ),
            (
                "a[1] > 1",
                "expected a quoted key after \"[\" (as in `features[\"vibration.z\"]`), found \
                 \"1\" at column 3",
            ),
            (
                "a[\"x\" > 1",
                "expected \"]\" to close the \"[\" at column 2, found \">\" at column 7",
            ),
            (
                "1. > a",
                "expected digits after the decimal point in \"1.\" at column 1",
            ),
            (
                "1e > a",
                "expected digits in the exponent of \"1e\" at column 1",
            ),
            (
                "12abc > a",
                "\"12abc\" is not a number (nor a field name, which cannot start with a digit) \
                 at column 1",
            ),
            ("a > 1e999", "the number 1e999 is too large at column 5"),
            (
                "score > 1 AND x",
                "expected an operator (\"and\", \"or\", a comparison, ...) or the end of the \
                 rule, found \"AND\"; did you mean \"and\"? (keywords are lower case) at column 11",
            ),
            (
                "score > 1 annd x",
                "expected an operator (\"and\", \"or\", a comparison, ...) or the end of the \
                 rule, found \"annd\"; did you mean \"and\"? at column 11",
            ),
            ("", "the rule is empty at column 1"),
            ("   ", "the rule is empty at column 4"),
            (
                "a > 1\n  and =< 2",
                "unknown operator \"=<\"; did you mean \"<=\"? at line 2 column 7",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(error(text), want, "{text}");
        }
    }

    #[test]
    fn errors_have_kinds_and_offsets() {
        let e = parse("a é 1").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Syntax);
        assert_eq!(e.column(), Some(3));
        // The column counts characters; the offset bytes.
        let e = parse("'é' = 1").unwrap_err();
        assert_eq!(e.span.map(|s| (s.offset, s.column)), Some((5, 5)));
    }

    #[test]
    fn hostile_rules_are_bounded() {
        let long = format!("a == \"{}\"", "x".repeat(MAX_RULE_BYTES));
        let e = parse(&long).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Limit);
        assert_eq!(e.span, None);
        assert!(
            e.to_string().starts_with("the rule is 4103 bytes long"),
            "{e}"
        );

        let depth = MAX_DEPTH + 1;
        let parens = format!("{}a{} > 1", "(".repeat(depth), ")".repeat(depth));
        let nots = format!("{}a", "not ".repeat(depth));
        let minuses = format!("{}a > 1", "-".repeat(depth));
        // Operator chains do not recurse while parsing, but build deep trees.
        let sums = format!("{}a > 1", "a + ".repeat(depth));
        for text in [parens, nots, minuses, sums] {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Limit, "{text}");
            assert!(e.message.contains("more than 64 levels"), "{e}");
        }
        // `and` and `or` chains are flat, so long ones are fine.
        let wide = vec!["a > 1"; 400].join(" and ");
        assert!(wide.len() < MAX_RULE_BYTES);
        assert!(parse(&wide).is_ok());
        // Just within the limit.
        let ok = format!("{}a{} > 1", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
    }
}
