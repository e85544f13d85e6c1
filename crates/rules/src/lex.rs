//! From rule text to tokens, one at a time, so that the parser reports the first mistake in
//! reading order.

use crate::ast::CmpOp;
use crate::{Error, ErrorKind, Result, Span};

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Ident,
    Number(f64),
    Str(String),
    And,
    Or,
    Not,
    In,
    True,
    False,
    Null,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Plus,
    Minus,
    Star,
    Slash,
    Cmp(CmpOp),
    Eof,
}

#[derive(Debug, Clone)]
pub(crate) struct Token<'a> {
    pub tok: Tok,
    pub span: Span,
    /// The token as written; names identifiers and keywords, and quotes tokens in messages.
    pub text: &'a str,
}

pub(crate) struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    line: usize,
    column: usize,
}

fn syntax(span: Span, message: impl Into<String>) -> Error {
    Error::at(ErrorKind::Syntax, span, message)
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(src: &'a str) -> Lexer<'a> {
        Lexer {
            src,
            pos: 0,
            line: 1,
            column: 1,
        }
    }

    pub(crate) fn here(&self) -> Span {
        Span {
            offset: self.pos,
            line: self.line,
            column: self.column,
        }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek2(&self) -> Option<char> {
        self.src[self.pos..].chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn bump_while(&mut self, pred: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&pred) {
            self.bump();
        }
    }

    pub(crate) fn next_token(&mut self) -> Result<Token<'a>> {
        self.bump_while(char::is_whitespace);
        let start = self.here();
        let tok = match self.peek() {
            None => Tok::Eof,
            Some(c) => match c {
                '(' | ')' | '[' | ']' | ',' | '.' | '+' | '-' | '*' | '/' => {
                    self.bump();
                    match c {
                        '(' => Tok::LParen,
                        ')' => Tok::RParen,
                        '[' => Tok::LBracket,
                        ']' => Tok::RBracket,
                        ',' => Tok::Comma,
                        '.' => Tok::Dot,
                        '+' => Tok::Plus,
                        '-' => Tok::Minus,
                        '*' => Tok::Star,
                        _ => Tok::Slash,
                    }
                }
                '"' | '\'' => self.string(start)?,
                '0'..='9' => self.number(start)?,
                c if c.is_ascii_alphabetic() || c == '_' => {
                    self.bump_while(|c| c.is_ascii_alphanumeric() || c == '_');
                    match &self.src[start.offset..self.pos] {
                        "and" => Tok::And,
                        "or" => Tok::Or,
                        "not" => Tok::Not,
                        "in" => Tok::In,
                        "true" => Tok::True,
                        "false" => Tok::False,
                        "null" => Tok::Null,
                        _ => Tok::Ident,
                    }
                }
                '=' | '<' | '>' | '!' | '&' | '|' => self.operator(start)?,
                other => {
                    return Err(syntax(start, format!("unexpected character {other:?}")));
                }
            },
        };
        Ok(Token {
            tok,
            span: start,
            text: &self.src[start.offset..self.pos],
        })
    }

    /// A run of operator characters, so that `=<` is reported as one unknown operator
    /// instead of `=` followed by `<`.
    fn operator(&mut self, start: Span) -> Result<Tok> {
        self.bump_while(|c| matches!(c, '=' | '<' | '>' | '!' | '&' | '|'));
        let op = &self.src[start.offset..self.pos];
        if let Some(cmp) = CmpOp::ALL.into_iter().find(|c| c.as_str() == op) {
            return Ok(Tok::Cmp(cmp));
        }
        let meant = match op {
            "=" | "===" => Some("=="),
            "=<" => Some("<="),
            "=>" => Some(">="),
            "<>" | "=!" | "!==" => Some("!="),
            "!" => Some("not"),
            "&&" | "&" => Some("and"),
            "||" | "|" => Some("or"),
            _ => None,
        };
        let hint = meant
            .map(|m| format!("; did you mean \"{m}\"?"))
            .unwrap_or_default();
        Err(syntax(start, format!("unknown operator \"{op}\"{hint}")))
    }

    fn string(&mut self, start: Span) -> Result<Tok> {
        let quote = self.bump().unwrap_or('"');
        let mut value = String::new();
        loop {
            let at = self.here();
            match self.bump() {
                None => return Err(syntax(start, "unterminated string")),
                Some(c) if c == quote => return Ok(Tok::Str(value)),
                Some('\\') => match self.bump() {
                    Some(c @ ('"' | '\'' | '\\')) => value.push(c),
                    None => return Err(syntax(start, "unterminated string")),
                    Some(c) => {
                        return Err(syntax(
                            at,
                            format!(
                                "unknown escape \"\\{c}\" in a string (only \\\", \\' and \\\\ \
                                 are escapes)"
                            ),
                        ));
                    }
                },
                Some(c) => value.push(c),
            }
        }
    }

    /// `12`, `0.8`, `1e-7`, `2.5E3`.
    fn number(&mut self, start: Span) -> Result<Tok> {
        let digit = |c: char| c.is_ascii_digit();
        self.bump_while(digit);
        if self.peek() == Some('.') {
            if !self.peek2().is_some_and(digit) {
                self.bump();
                return Err(syntax(
                    start,
                    format!(
                        "expected digits after the decimal point in \"{}\"",
                        &self.src[start.offset..self.pos]
                    ),
                ));
            }
            self.bump();
            self.bump_while(digit);
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            self.bump();
            if matches!(self.peek(), Some('+' | '-')) {
                self.bump();
            }
            if !self.peek().is_some_and(digit) {
                return Err(syntax(
                    start,
                    format!(
                        "expected digits in the exponent of \"{}\"",
                        &self.src[start.offset..self.pos]
                    ),
                ));
            }
            self.bump_while(digit);
        }
        if self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.bump_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            return Err(syntax(
                start,
                format!(
                    "\"{}\" is not a number (nor a field name, which cannot start with a digit)",
                    &self.src[start.offset..self.pos]
                ),
            ));
        }
        let text = &self.src[start.offset..self.pos];
        match text.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(Tok::Number(n)),
            _ => Err(syntax(start, format!("the number {text} is too large"))),
        }
    }
}
