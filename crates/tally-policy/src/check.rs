//! The type checker: every CEL expression of a policy is checked against the
//! vocabulary when the policy is applied, so a type error is a status
//! message, never an evaluation failure.
//!
//! It infers the type of every node, refuses what the vocabulary does not
//! know (an unknown root or attribute, an unsupported function, a macro),
//! collects the attributes the expression needs (those read outside
//! `has()`), and adds up a cost. What it accepts can still fail at
//! evaluation only on values (`int('x')`, a division by zero, an overflow);
//! evaluation turns that into "does not match".

use cel::common::ast::{CallExpr, EntryExpr, Expr, LiteralValue, SelectExpr};
use cel::parser::Expression;

use crate::vocab::{self, AttrId, Ty};

/// Most a checked expression may cost: one per node, more for string
/// scans and regular expressions.
pub const MAX_COST: u32 = 1_000;

/// How deep the syntax tree may nest. The parser's own limit does not
/// bound chains of left-associative operators (`a + 1 + 1 + ...` nests one
/// level per `+`), and evaluation recurses once per level.
pub const MAX_DEPTH: u32 = 32;

/// What the checker learned of an expression.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checked {
    /// Attributes read outside `has()`: a record without one does not match.
    pub required: u64,
    /// Every attribute the expression reads (what evaluation must provide).
    pub used: u64,
    /// Header names read with a literal name, as (response?, name).
    pub headers: Vec<(bool, String)>,
    pub cost: u32,
    /// The current depth while checking.
    depth: u32,
}

/// A node's inferred type: a value type, or a namespace of the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
enum T {
    Ty(Ty),
    Path(String),
}

/// Checks `expr`; its type, or the first error, in words for a status.
pub fn check(expr: &Expression) -> Result<(Ty, Checked), String> {
    let mut checked = Checked::default();
    let ty = match node(expr, &mut checked, false)? {
        T::Ty(ty) => ty,
        T::Path(p) => return Err(format!("'{p}' is a namespace of attributes, not a value")),
    };
    if checked.cost > MAX_COST {
        return Err(format!(
            "the expression costs {} to evaluate, more than the limit {MAX_COST}",
            checked.cost
        ));
    }
    Ok((ty, checked))
}

fn value(e: &Expression, c: &mut Checked) -> Result<Ty, String> {
    match node(e, c, false)? {
        T::Ty(ty) => Ok(ty),
        T::Path(p) => Err(format!("'{p}' is a namespace of attributes, not a value")),
    }
}

fn node(e: &Expression, c: &mut Checked, in_has: bool) -> Result<T, String> {
    c.cost = c.cost.saturating_add(1);
    c.depth += 1;
    if c.depth > MAX_DEPTH {
        return Err(format!(
            "the expression nests deeper than {MAX_DEPTH} levels (operators included)"
        ));
    }
    let t = node_inner(e, c, in_has);
    c.depth -= 1;
    t
}

fn node_inner(e: &Expression, c: &mut Checked, in_has: bool) -> Result<T, String> {
    match &e.expr {
        Expr::Literal(l) => Ok(T::Ty(literal(l))),
        Expr::Ident(name) => ident(name, c, in_has),
        Expr::Select(s) => select(s, c, in_has),
        Expr::Call(call) => self::call(call, c).map(T::Ty),
        Expr::List(l) => {
            for el in &l.elements {
                value(el, c)?;
            }
            Ok(T::Ty(Ty::List))
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                match &entry.expr {
                    EntryExpr::MapEntry(me) => {
                        value(&me.key, c)?;
                        value(&me.value, c)?;
                    }
                    EntryExpr::StructField(_) => {
                        return Err("message literals are not supported".into());
                    }
                }
            }
            Ok(T::Ty(Ty::Map))
        }
        Expr::Struct(_) => Err("message literals are not supported".into()),
        Expr::Comprehension(_) => Err(
            "macros (all, exists, exists_one, map, filter) are not supported in telemetry policies"
                .into(),
        ),
        Expr::Unspecified => Err("an empty expression".into()),
    }
}

fn literal(l: &LiteralValue) -> Ty {
    match l {
        LiteralValue::Boolean(_) => Ty::Bool,
        LiteralValue::Bytes(_) => Ty::Bytes,
        LiteralValue::Double(_) => Ty::Double,
        LiteralValue::Int(_) => Ty::Int,
        LiteralValue::Null => Ty::Null,
        LiteralValue::String(_) => Ty::String,
        LiteralValue::UInt(_) => Ty::Uint,
    }
}

fn ident(name: &str, c: &mut Checked, in_has: bool) -> Result<T, String> {
    if name == "project" {
        let id = vocab::A::Project as AttrId;
        leaf(id, c, in_has);
        return Ok(T::Ty(vocab::ATTRIBUTES[id].ty));
    }
    if vocab::ROOTS.contains(&name) {
        return Ok(T::Path(name.to_owned()));
    }
    Err(format!(
        "unknown identifier '{name}' (an expression reads {})",
        vocab::ROOTS.join(", ")
    ))
}

fn leaf(id: AttrId, c: &mut Checked, in_has: bool) {
    c.used |= 1 << id;
    if !in_has {
        c.required |= 1 << id;
    }
}

fn select(s: &SelectExpr, c: &mut Checked, in_has: bool) -> Result<T, String> {
    // The operand of a presence test is read for its parts, not required.
    let inner = node(&s.operand, c, in_has || s.test)?;
    let result = match inner {
        T::Path(prefix) => {
            let full = format!("{prefix}.{}", s.field);
            if let Some(id) = vocab::ATTRIBUTES.iter().position(|a| a.name == full) {
                leaf(id, c, in_has || s.test);
                T::Ty(vocab::ATTRIBUTES[id].ty)
            } else if vocab::is_namespace(&full) {
                T::Path(full)
            } else {
                return Err(format!("unknown attribute '{full}'"));
            }
        }
        T::Ty(Ty::StringMap) => {
            let response = matches!(&s.operand.expr, Expr::Select(o) if o.field == "headers"
                && matches!(&o.operand.expr, Expr::Ident(r) if r == "response"));
            if !(in_has || s.test) {
                c.headers.push((response, s.field.to_ascii_lowercase()));
            }
            T::Ty(Ty::String)
        }
        T::Ty(Ty::Map | Ty::Dyn) => T::Ty(Ty::Dyn),
        T::Ty(other) => {
            return Err(format!("a {} has no field '{}'", other.name(), s.field));
        }
    };
    Ok(if s.test { T::Ty(Ty::Bool) } else { result })
}

fn args(call: &CallExpr, c: &mut Checked) -> Result<Vec<Ty>, String> {
    let mut out = Vec::with_capacity(call.args.len() + 1);
    if let Some(target) = &call.target {
        out.push(value(target, c)?);
    }
    for a in &call.args {
        out.push(value(a, c)?);
    }
    Ok(out)
}

fn mismatch(op: &str, tys: &[Ty]) -> String {
    let names: Vec<&str> = tys.iter().map(|t| t.name()).collect();
    format!("no overload of '{op}' takes ({})", names.join(", "))
}

fn call(call: &CallExpr, c: &mut Checked) -> Result<Ty, String> {
    let name = call.func_name.as_str();
    let tys = args(call, c)?;
    let dynamic = tys.iter().any(|t| matches!(t, Ty::Dyn));
    let op = display_name(name);
    match (name, tys.as_slice()) {
        (_, _) if dynamic && is_operator(name) => Ok(operator_result(name, &tys)),
        ("_&&_" | "_||_", [Ty::Bool, Ty::Bool]) | ("!_", [Ty::Bool]) => Ok(Ty::Bool),
        ("-_", [t]) if t.is_numeric() || *t == Ty::Duration => Ok(*t),
        ("_?_:_", [Ty::Bool, a, b]) if a == b || *b == Ty::Null => Ok(*a),
        ("_?_:_", [Ty::Bool, Ty::Null, b]) => Ok(*b),
        ("_==_" | "_!=_", [a, b]) if a == b || (a.is_numeric() && b.is_numeric()) => Ok(Ty::Bool),
        ("_==_" | "_!=_", [_, Ty::Null] | [Ty::Null, _]) => Ok(Ty::Bool),
        ("_<_" | "_<=_" | "_>_" | "_>=_", [a, b]) if ordered(*a, *b) => Ok(Ty::Bool),
        ("_+_", [a, b]) => add(*a, *b).ok_or_else(|| mismatch(op, &tys)),
        ("_-_", [a, b]) => subtract(*a, *b).ok_or_else(|| mismatch(op, &tys)),
        ("_*_" | "_/_", [a, b]) if a == b && a.is_numeric() => Ok(*a),
        ("_%_", [a, b]) if a == b && matches!(a, Ty::Int | Ty::Uint) => Ok(*a),
        ("_[_]", [Ty::StringMap, Ty::String]) => {
            header_index(call, c);
            Ok(Ty::String)
        }
        ("_[_]", [Ty::List, Ty::Int | Ty::Uint] | [Ty::Map, _]) => Ok(Ty::Dyn),
        ("@in", [_, Ty::List | Ty::Map]) | ("@in", [Ty::String, Ty::StringMap]) => Ok(Ty::Bool),
        ("size", [Ty::String | Ty::Bytes | Ty::List | Ty::Map | Ty::StringMap]) => {
            c.cost = c.cost.saturating_add(4);
            Ok(Ty::Int)
        }
        ("contains" | "startsWith" | "endsWith", [Ty::String, Ty::String]) => {
            c.cost = c.cost.saturating_add(8);
            Ok(Ty::Bool)
        }
        ("matches", [Ty::String, Ty::String]) => matches(call, c),
        ("duration", [Ty::String]) => constant(call, Ty::Duration),
        ("timestamp", [Ty::String]) => constant(call, Ty::Timestamp),
        ("int", [Ty::Int | Ty::Uint | Ty::Double | Ty::String | Ty::Timestamp]) => Ok(Ty::Int),
        ("uint", [Ty::Int | Ty::Uint | Ty::Double | Ty::String]) => Ok(Ty::Uint),
        ("double", [Ty::Int | Ty::Uint | Ty::Double | Ty::String]) => Ok(Ty::Double),
        ("string", [t]) if t.is_scalar() || *t == Ty::Bytes => Ok(Ty::String),
        _ if is_operator(name) || KNOWN.contains(&name) => Err(mismatch(op, &tys)),
        _ => Err(format!(
            "function '{name}' is not supported (supported: {})",
            KNOWN.join(", ")
        )),
    }
}

const KNOWN: &[&str] = &[
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "duration",
    "timestamp",
    "int",
    "uint",
    "double",
    "string",
];

fn is_operator(name: &str) -> bool {
    name.starts_with('_') || name.starts_with('!') || name.starts_with('-') || name == "@in"
}

fn display_name(name: &str) -> &str {
    match name {
        "_&&_" => "&&",
        "_||_" => "||",
        "!_" => "!",
        "-_" => "-",
        "_?_:_" => "?:",
        "_==_" => "==",
        "_!=_" => "!=",
        "_<_" => "<",
        "_<=_" => "<=",
        "_>_" => ">",
        "_>=_" => ">=",
        "_+_" => "+",
        "_-_" => "-",
        "_*_" => "*",
        "_/_" => "/",
        "_%_" => "%",
        "_[_]" => "[]",
        "@in" => "in",
        other => other,
    }
}

/// The type of an operator with a `dyn` operand: booleans for logic and
/// comparisons, `dyn` otherwise.
fn operator_result(name: &str, tys: &[Ty]) -> Ty {
    match name {
        "_&&_" | "_||_" | "!_" | "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" | "@in" => {
            Ty::Bool
        }
        "_?_:_" => tys.get(1).copied().unwrap_or(Ty::Dyn),
        _ => Ty::Dyn,
    }
}

fn ordered(a: Ty, b: Ty) -> bool {
    (a.is_numeric() && b.is_numeric())
        || (a == b
            && matches!(
                a,
                Ty::String | Ty::Bytes | Ty::Bool | Ty::Duration | Ty::Timestamp
            ))
}

fn add(a: Ty, b: Ty) -> Option<Ty> {
    match (a, b) {
        (Ty::Int, Ty::Int) | (Ty::Uint, Ty::Uint) | (Ty::Double, Ty::Double) => Some(a),
        (Ty::String, Ty::String) | (Ty::Bytes, Ty::Bytes) | (Ty::List, Ty::List) => Some(a),
        (Ty::Duration, Ty::Duration) => Some(Ty::Duration),
        (Ty::Timestamp, Ty::Duration) | (Ty::Duration, Ty::Timestamp) => Some(Ty::Timestamp),
        _ => None,
    }
}

fn subtract(a: Ty, b: Ty) -> Option<Ty> {
    match (a, b) {
        (Ty::Int, Ty::Int) | (Ty::Uint, Ty::Uint) | (Ty::Double, Ty::Double) => Some(a),
        (Ty::Duration, Ty::Duration) | (Ty::Timestamp, Ty::Timestamp) => Some(Ty::Duration),
        (Ty::Timestamp, Ty::Duration) => Some(Ty::Timestamp),
        _ => None,
    }
}

/// `request.headers['x-name']`: the header is required when named literally.
fn header_index(call: &CallExpr, c: &mut Checked) {
    let (Some(map), Some(key)) = (call.args.first(), call.args.get(1)) else {
        return;
    };
    if let Expr::Literal(LiteralValue::String(name)) = &key.expr {
        let response = matches!(&map.expr, Expr::Select(o)
            if matches!(&o.operand.expr, Expr::Ident(r) if r == "response"));
        c.headers
            .push((response, name.inner().to_ascii_lowercase()));
    }
}

/// `x.matches('re')`: the pattern must be a literal that compiles.
fn matches(call: &CallExpr, c: &mut Checked) -> Result<Ty, String> {
    let pattern = match call.args.first().map(|a| &a.expr) {
        Some(Expr::Literal(LiteralValue::String(p))) => p.inner().to_owned(),
        _ => return Err("the pattern of matches() must be a string literal".into()),
    };
    regex::RegexBuilder::new(&pattern)
        .size_limit(1 << 16)
        .build()
        .map_err(|e| format!("matches(): the pattern does not compile: {e}"))?;
    c.cost = c.cost.saturating_add(50);
    Ok(Ty::Bool)
}

/// `duration('2s')`, `timestamp('...')`: a literal argument is evaluated
/// now, so a malformed one is an apply-time error.
fn constant(call: &CallExpr, ty: Ty) -> Result<Ty, String> {
    let Some(Expr::Literal(LiteralValue::String(text))) = call.args.first().map(|a| &a.expr) else {
        return Ok(ty);
    };
    let program = format!("{}({:?})", call.func_name, text.inner());
    let parsed = cel::parser::Parser::new()
        .parse(&program)
        .map_err(|e| format!("{}: {e}", call.func_name))?;
    cel::Value::resolve(&parsed, &cel::Context::default())
        .map(|_| ty)
        .map_err(|e| format!("{}({:?}): {e}", call.func_name, text.inner()))
}
