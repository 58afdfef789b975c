//! A native evaluator for the usual shape of an access-log match:
//! comparisons of attributes, request or response headers and literals,
//! joined by `&&`, `||` and `!` (`response.code >= 500 ||
//! request.duration > duration('2s')`). It reads the [`Record`] directly,
//! borrowing its strings, instead of building CEL maps and walking the
//! interpreter: no allocation per record.
//!
//! [`Fast::compile`] accepts only what it evaluates exactly as the `cel`
//! interpreter does, and returns `None` for anything else (functions,
//! arithmetic, `has()`, `in`, comparisons across types, doubles): such an
//! expression is evaluated by the interpreter. The semantics are CEL's,
//! errors included: an absent attribute or header is an error; `==`, `!=`,
//! `<`... propagate errors; `a || b` is true if either side is true, else
//! false if both are false, else an error (`&&` alike with false); `!`
//! propagates errors. A property test checks it against the interpreter.

use cel::common::ast::{Expr, LiteralValue};
use cel::parser::Expression;

use crate::record::{AttrValue, Record};
use crate::vocab::{A, ATTRIBUTES, AttrId, Ty};

/// A compiled expression of the supported shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fast {
    Lit(Lit),
    /// A scalar attribute of the vocabulary.
    Attr(AttrId),
    /// `request.headers['name']` / `response.headers['name']`, the name as
    /// written (keys are lower case, so another spelling is absent).
    Header {
        response: bool,
        name: String,
    },
    Cmp(Op, Box<Fast>, Box<Fast>),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Not(Box<Fast>),
}

/// A literal.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lit {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Str(String),
    /// Nanoseconds.
    Duration(i64),
    /// Nanoseconds since the epoch.
    Timestamp(i64),
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A value while evaluating, borrowed from the record or the expression.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Val<'a> {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Str(&'a str),
    Duration(i64),
    Timestamp(i64),
}

/// An evaluation error (its reason does not matter: it means no match).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Error;

impl Fast {
    /// The fast form of `expr`, if it has the supported shape.
    pub(crate) fn compile(expr: &Expression) -> Option<Fast> {
        let fast = node(expr)?;
        (fast.ty() == Some(Ty::Bool)).then_some(fast)
    }

    /// Whether `record` matches (the expression is `true`).
    pub(crate) fn matches(&self, record: &Record<'_>) -> bool {
        matches!(self.eval(record), Ok(Val::Bool(true)))
    }

    /// The static type of the node; `None` if it has none of the types
    /// handled.
    fn ty(&self) -> Option<Ty> {
        Some(match self {
            Fast::Lit(Lit::Bool(_)) | Fast::Cmp(..) | Fast::And(..) | Fast::Or(..) => Ty::Bool,
            Fast::Not(_) => Ty::Bool,
            Fast::Lit(Lit::Int(_)) => Ty::Int,
            Fast::Lit(Lit::Uint(_)) => Ty::Uint,
            Fast::Lit(Lit::Str(_)) | Fast::Header { .. } => Ty::String,
            Fast::Lit(Lit::Duration(_)) => Ty::Duration,
            Fast::Lit(Lit::Timestamp(_)) => Ty::Timestamp,
            Fast::Attr(id) => ATTRIBUTES[*id].ty,
        })
    }

    fn eval<'a>(&'a self, record: &'a Record<'_>) -> Result<Val<'a>, Error> {
        match self {
            Fast::Lit(lit) => Ok(match lit {
                Lit::Bool(b) => Val::Bool(*b),
                Lit::Int(i) => Val::Int(*i),
                Lit::Uint(u) => Val::Uint(*u),
                Lit::Str(s) => Val::Str(s),
                Lit::Duration(ns) => Val::Duration(*ns),
                Lit::Timestamp(ns) => Val::Timestamp(*ns),
            }),
            Fast::Attr(id) => match record.get(*id).ok_or(Error)? {
                AttrValue::Str(s) => Ok(Val::Str(s)),
                AttrValue::Int(i) => Ok(Val::Int(*i)),
                AttrValue::Uint(u) => Ok(Val::Uint(*u)),
                AttrValue::Bool(b) => Ok(Val::Bool(*b)),
                AttrValue::Duration(ns) => Ok(Val::Duration(*ns)),
                AttrValue::Timestamp(ns) => Ok(Val::Timestamp(*ns)),
                AttrValue::Headers(_) => Err(Error),
            },
            Fast::Header { response, name } => header_value(record, *response, name),
            Fast::Cmp(op, left, right) => {
                let (l, r) = (left.eval(record)?, right.eval(record)?);
                compare(*op, l, r).map(Val::Bool)
            }
            Fast::Or(left, right) => {
                let l = left.eval(record).and_then(boolean);
                if l == Ok(true) {
                    return Ok(Val::Bool(true));
                }
                let r = boolean(right.eval(record)?)?;
                match (l, r) {
                    (Ok(false), r) | (Err(_), r @ true) => Ok(Val::Bool(r)),
                    _ => Err(Error),
                }
            }
            Fast::And(left, right) => {
                let l = left.eval(record).and_then(boolean);
                if l == Ok(false) {
                    return Ok(Val::Bool(false));
                }
                let r = boolean(right.eval(record)?)?;
                match (l, r) {
                    (Ok(true), r) | (Err(_), r @ false) => Ok(Val::Bool(r)),
                    _ => Err(Error),
                }
            }
            Fast::Not(inner) => Ok(Val::Bool(!boolean(inner.eval(record)?)?)),
        }
    }
}

/// Header `name`; of several, the last (as in the interpreter's map).
fn header_value<'a>(record: &'a Record<'_>, response: bool, name: &str) -> Result<Val<'a>, Error> {
    let a = if response {
        A::ResponseHeaders
    } else {
        A::RequestHeaders
    };
    match record.get(a as usize) {
        Some(AttrValue::Headers(h)) => h
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| Val::Str(v))
            .ok_or(Error),
        _ => Err(Error),
    }
}

fn boolean(v: Val<'_>) -> Result<bool, Error> {
    match v {
        Val::Bool(b) => Ok(b),
        _ => Err(Error),
    }
}

/// A comparison of two values of one type.
fn compare(op: Op, l: Val<'_>, r: Val<'_>) -> Result<bool, Error> {
    use std::cmp::Ordering;
    let ordering: Ordering = match (l, r) {
        (Val::Int(a), Val::Int(b)) => a.cmp(&b),
        (Val::Uint(a), Val::Uint(b)) => a.cmp(&b),
        (Val::Str(a), Val::Str(b)) => a.cmp(b),
        (Val::Duration(a), Val::Duration(b)) | (Val::Timestamp(a), Val::Timestamp(b)) => a.cmp(&b),
        (Val::Bool(a), Val::Bool(b)) if matches!(op, Op::Eq | Op::Ne) => a.cmp(&b),
        _ => return Err(Error),
    };
    Ok(match op {
        Op::Eq => ordering == Ordering::Equal,
        Op::Ne => ordering != Ordering::Equal,
        Op::Lt => ordering == Ordering::Less,
        Op::Le => ordering != Ordering::Greater,
        Op::Gt => ordering == Ordering::Greater,
        Op::Ge => ordering != Ordering::Less,
    })
}

fn node(e: &Expression) -> Option<Fast> {
    match &e.expr {
        Expr::Literal(LiteralValue::Boolean(b)) => Some(Fast::Lit(Lit::Bool(*b.inner()))),
        Expr::Literal(LiteralValue::Int(i)) => Some(Fast::Lit(Lit::Int(*i.inner()))),
        Expr::Literal(LiteralValue::UInt(u)) => Some(Fast::Lit(Lit::Uint(*u.inner()))),
        Expr::Literal(LiteralValue::String(s)) => Some(Fast::Lit(Lit::Str(s.inner().to_owned()))),
        Expr::Ident(_) | Expr::Select(_) => attribute(e),
        Expr::Call(call) if call.target.is_none() => {
            let args: Vec<&Expression> = call.args.iter().collect();
            match (call.func_name.as_str(), args.as_slice()) {
                ("_&&_", [l, r]) => logical(l, r, Fast::And),
                ("_||_", [l, r]) => logical(l, r, Fast::Or),
                ("!_", [x]) => {
                    let x = node(x)?;
                    (x.ty()? == Ty::Bool).then(|| Fast::Not(Box::new(x)))
                }
                ("_[_]", [map, key]) => header(map, key),
                ("duration" | "timestamp", [_]) => constant(e),
                (name, [l, r]) => {
                    let op = match name {
                        "_==_" => Op::Eq,
                        "_!=_" => Op::Ne,
                        "_<_" => Op::Lt,
                        "_<=_" => Op::Le,
                        "_>_" => Op::Gt,
                        "_>=_" => Op::Ge,
                        _ => return None,
                    };
                    let (l, r) = (node(l)?, node(r)?);
                    let ty = l.ty()?;
                    let ordered = matches!(
                        ty,
                        Ty::Int | Ty::Uint | Ty::String | Ty::Duration | Ty::Timestamp
                    );
                    let ok = r.ty()? == ty
                        && (ordered || (ty == Ty::Bool && matches!(op, Op::Eq | Op::Ne)));
                    ok.then(|| Fast::Cmp(op, Box::new(l), Box::new(r)))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn logical(l: &Expression, r: &Expression, join: fn(Box<Fast>, Box<Fast>) -> Fast) -> Option<Fast> {
    let (l, r) = (node(l)?, node(r)?);
    (l.ty()? == Ty::Bool && r.ty()? == Ty::Bool).then(|| join(Box::new(l), Box::new(r)))
}

/// A dotted path naming a scalar attribute of the vocabulary.
fn attribute(e: &Expression) -> Option<Fast> {
    let path = dotted(e)?;
    let id = ATTRIBUTES.iter().position(|a| a.name == path)?;
    let scalar = matches!(
        ATTRIBUTES[id].ty,
        Ty::Bool | Ty::Int | Ty::Uint | Ty::String | Ty::Duration | Ty::Timestamp
    );
    scalar.then_some(Fast::Attr(id))
}

/// `a.b.c` as text.
fn dotted(e: &Expression) -> Option<String> {
    match &e.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(s) if !s.test => Some(format!("{}.{}", dotted(&s.operand)?, s.field)),
        _ => None,
    }
}

/// `request.headers['x-name']` with a literal name.
fn header(map: &Expression, key: &Expression) -> Option<Fast> {
    let Expr::Literal(LiteralValue::String(name)) = &key.expr else {
        return None;
    };
    let response = match dotted(map)?.as_str() {
        "request.headers" => false,
        "response.headers" => true,
        _ => return None,
    };
    Some(Fast::Header {
        response,
        name: name.inner().to_owned(),
    })
}

/// `duration('2s')` or `timestamp('...')` of a literal, evaluated once by
/// the interpreter itself (so parsing is CEL's).
fn constant(e: &Expression) -> Option<Fast> {
    let Expr::Call(call) = &e.expr else {
        return None;
    };
    if !matches!(
        call.args.first().map(|a| &a.expr),
        Some(Expr::Literal(LiteralValue::String(_)))
    ) {
        return None;
    }
    match cel::Value::resolve(e, &cel::Context::default()).ok()? {
        cel::Value::Duration(d) => Some(Fast::Lit(Lit::Duration(d.num_nanoseconds()?))),
        cel::Value::Timestamp(t) => Some(Fast::Lit(Lit::Timestamp(t.timestamp_nanos_opt()?))),
        _ => None,
    }
}
