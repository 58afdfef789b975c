//! A CEL expression of a policy, compiled once per policy version: bounded
//! (bytes, nesting, parser recursion, cost), parsed by the `cel` crate,
//! type-checked against the vocabulary ([`crate::check`]), and evaluated
//! against [`Record`]s.
//!
//! **Semantics of absence:** an attribute the record lacks is simply not
//! there: the sub-expression reading it fails, and CEL's logical operators
//! absorb that failure when the other side decides (`response.code >= 500
//! || request.duration > duration('2s')` matches a 503 that has no
//! duration). When the failure decides the result, the record does not
//! match (a field, dimension or tag has no value). A value error
//! (`int('x')`, division by zero, overflow) is treated the same way:
//! evaluation never fails a record.

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::{Key, Map};
use cel::parser::{Expression, Parser};
use cel::{Context, Value};

use crate::check::{self, Checked};
use crate::fast::Fast;
use crate::record::{AttrValue, Record};
use crate::vocab::{ATTRIBUTES, Ty};

/// Bytes an expression may have.
pub const MAX_EXPRESSION_BYTES: usize = 1024;
/// How deep brackets and parentheses may nest.
pub const MAX_NESTING: usize = 12;
/// The stack of the thread that parses: the `cel` crate's generated
/// (ANTLR) parser takes hundreds of KiB of stack per level of brackets in
/// a debug build, more than a worker thread has. Reserved, not committed:
/// only what the parse touches is used.
const PARSE_STACK_BYTES: usize = 128 << 20;
/// The CEL parser's recursion limit (operator chains included).
pub const MAX_RECURSION: u16 = 32;

/// A compiled expression.
#[derive(Debug, Clone)]
pub struct CompiledExpr {
    source: String,
    ast: Arc<Expression>,
    ty: Ty,
    checked: Checked,
    /// The native form, when the expression has its shape.
    fast: Option<Arc<Fast>>,
}

impl PartialEq for CompiledExpr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl CompiledExpr {
    /// Compiles `source`; the error is a sentence for a status message.
    pub fn compile(source: &str) -> Result<CompiledExpr, String> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "the expression has {} bytes, more than {MAX_EXPRESSION_BYTES}",
                source.len()
            ));
        }
        if tally_model::nesting::nesting_exceeds(source.as_bytes(), MAX_NESTING) {
            return Err(format!(
                "the expression nests deeper than {MAX_NESTING} levels"
            ));
        }
        let owned = source.to_owned();
        // Parsed, checked and (if refused) dropped on a thread with room.
        let parsed = std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(PARSE_STACK_BYTES)
            .spawn(move || {
                let ast = Parser::new()
                    .max_recursion_depth(MAX_RECURSION)
                    .parse(&owned)
                    .map_err(|e| format!("does not parse: {}", first_line(&e.to_string())))?;
                let (ty, checked) = check::check(&ast)?;
                let fast = Fast::compile(&ast).map(Arc::new);
                Ok(CompiledExpr {
                    source: owned,
                    ast: Arc::new(ast),
                    ty,
                    checked,
                    fast,
                })
            })
            .map_err(|e| format!("could not start the CEL compiler: {e}"))?;
        parsed
            .join()
            .unwrap_or_else(|_| Err("the CEL compiler failed on this expression".into()))
    }

    /// Compiles a boolean expression (an access-log match).
    pub fn compile_bool(source: &str) -> Result<CompiledExpr, String> {
        let e = CompiledExpr::compile(source)?;
        match e.ty {
            Ty::Bool | Ty::Dyn => Ok(e),
            other => Err(format!(
                "a match must be a bool, this is a {}",
                other.name()
            )),
        }
    }

    /// Compiles a value expression (a field, dimension or tag).
    pub fn compile_scalar(source: &str) -> Result<CompiledExpr, String> {
        let e = CompiledExpr::compile(source)?;
        if e.ty.is_scalar() {
            Ok(e)
        } else {
            Err(format!(
                "a value must be a scalar, this is a {}",
                e.ty.name()
            ))
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn ty(&self) -> Ty {
        self.ty
    }

    /// The checker's cost of the expression.
    pub fn cost(&self) -> u32 {
        self.checked.cost
    }

    /// The value of the expression for `record`, `None` if the record
    /// lacks what it needs or evaluation raised an error.
    pub fn eval(&self, record: &Record<'_>) -> Option<Value> {
        self.eval_in(&context(self.checked.used, record))
    }

    /// The value in a context already built for the record (with at least
    /// the attributes of [`CompiledExpr::used`]).
    pub fn eval_in(&self, context: &Context<'_, '_>) -> Option<Value> {
        Value::resolve(&self.ast, context).ok()
    }

    /// The attributes the expression reads, as a bit set of attribute ids.
    pub fn used(&self) -> u64 {
        self.checked.used
    }

    /// Whether `record` matches (a boolean expression that is `true`).
    pub fn matches(&self, record: &Record<'_>) -> bool {
        self.fast_matches(record)
            .unwrap_or_else(|| self.interpreted_matches(record))
    }

    /// Whether `record` matches, by the native evaluator ([`crate::fast`]);
    /// `None` if the expression does not have its shape.
    pub fn fast_matches(&self, record: &Record<'_>) -> Option<bool> {
        self.fast.as_ref().map(|f| f.matches(record))
    }

    /// Whether `record` matches, by the CEL interpreter.
    pub fn interpreted_matches(&self, record: &Record<'_>) -> bool {
        matches!(self.eval(record), Some(Value::Bool(true)))
    }

    /// Whether the native evaluator evaluates this expression.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// The expression's value for `record` as text (`None`: no value).
    pub fn render(&self, record: &Record<'_>) -> Option<String> {
        render(&self.eval(record)?)
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// The variables of a root, built from dotted paths.
enum Tree {
    Leaf(Value),
    Node(Vec<(&'static str, Tree)>),
}

impl Tree {
    fn insert(&mut self, path: &[&'static str], value: Option<Value>) {
        let Tree::Node(children) = self else {
            return;
        };
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        if rest.is_empty() {
            if let Some(v) = value {
                children.push((first, Tree::Leaf(v)));
            }
            return;
        }
        let child = match children.iter().position(|(k, _)| k == first) {
            Some(i) => &mut children[i].1,
            None => {
                children.push((first, Tree::Node(Vec::new())));
                &mut children.last_mut().expect("just pushed").1
            }
        };
        child.insert(rest, value);
    }

    fn into_value(self) -> Value {
        match self {
            Tree::Leaf(v) => v,
            Tree::Node(children) => {
                let map: HashMap<Key, Value> = children
                    .into_iter()
                    .map(|(k, t)| (Key::String(Arc::new(k.to_owned())), t.into_value()))
                    .collect();
                Value::Map(Map { map: Arc::new(map) })
            }
        }
    }
}

fn to_value(v: &AttrValue<'_>) -> Value {
    match v {
        AttrValue::Str(s) => Value::String(Arc::new(s.to_string())),
        AttrValue::Int(i) => Value::Int(*i),
        AttrValue::Uint(u) => Value::UInt(*u),
        AttrValue::Bool(b) => Value::Bool(*b),
        AttrValue::Duration(ns) => Value::Duration(chrono::Duration::nanoseconds(*ns)),
        AttrValue::Timestamp(ns) => {
            let utc = chrono::DateTime::from_timestamp_nanos(*ns);
            Value::Timestamp(utc.fixed_offset())
        }
        AttrValue::Headers(h) => {
            let map: HashMap<Key, Value> = h
                .iter()
                .map(|(k, v)| {
                    (
                        Key::String(Arc::new(k.to_string())),
                        Value::String(Arc::new(v.to_string())),
                    )
                })
                .collect();
            Value::Map(Map { map: Arc::new(map) })
        }
    }
}

/// A scalar CEL value as text; lists, maps and the like have none.
pub fn render(value: &Value) -> Option<String> {
    Some(match value {
        Value::String(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Duration(d) => format!(
            "{}s",
            d.num_nanoseconds()
                .map_or(d.num_seconds() as f64, |n| n as f64 / 1e9)
        ),
        Value::Timestamp(t) => t.to_rfc3339(),
        _ => return None,
    })
}

/// The variables of the roots of the attributes in `used`, holding those
/// `record` has (namespaces always exist, so `has()` answers instead of
/// failing). One context serves every expression that reads no more.
pub fn context(used: u64, record: &Record<'_>) -> Context<'static, 'static> {
    let mut roots: Vec<(&'static str, Tree)> = Vec::new();
    let mut bits = used;
    while bits != 0 {
        let id = bits.trailing_zeros() as usize;
        bits &= bits - 1;
        let name = ATTRIBUTES[id].name;
        let value = record.get(id).map(to_value);
        let mut parts = name.split('.');
        let root = parts.next().unwrap_or(name);
        let rest: Vec<&str> = parts.collect();
        if rest.is_empty() {
            if let Some(v) = value {
                roots.push((root, Tree::Leaf(v)));
            }
            continue;
        }
        let at = match roots.iter().position(|(r, _)| *r == root) {
            Some(i) => i,
            None => {
                roots.push((root, Tree::Node(Vec::new())));
                roots.len() - 1
            }
        };
        roots[at].1.insert(&rest, value);
    }
    let mut context = Context::with_env(Arc::clone(stdlib()));
    for (root, tree) in roots {
        context.add_variable_from_value(root, tree.into_value());
    }
    context
}

/// CEL's standard library, built once: `Context::default()` builds it anew
/// for every context, which cost ~50 µs per evaluated record.
fn stdlib() -> &'static Arc<cel::Env> {
    static STDLIB: std::sync::OnceLock<Arc<cel::Env>> = std::sync::OnceLock::new();
    STDLIB.get_or_init(|| Arc::new(cel::Env::stdlib()))
}
