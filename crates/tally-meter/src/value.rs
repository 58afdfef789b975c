//! Exact numbers from JSON values.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{Number, Value};

/// Reads a JSON number or numeric string as an exact decimal.
///
/// Integers are exact up to 28 digits; floating-point numbers are taken at
/// their shortest round-trip text (so `0.1` is exactly one tenth).
pub fn decimal_from_json(value: &Value) -> Result<Decimal, String> {
    match value {
        Value::Number(n) => decimal_from_number(n),
        Value::String(s) => parse_decimal(s.trim()),
        other => Err(format!(
            "expected a number or numeric string, got {}",
            tally_model::event::json_type(other)
        )),
    }
}

fn decimal_from_number(n: &Number) -> Result<Decimal, String> {
    if let Some(i) = n.as_i64() {
        Ok(Decimal::from(i))
    } else if let Some(u) = n.as_u64() {
        Ok(Decimal::from(u))
    } else {
        parse_decimal(&n.to_string())
    }
}

fn parse_decimal(s: &str) -> Result<Decimal, String> {
    if s.is_empty() {
        return Err("expected a number, got an empty string".into());
    }
    Decimal::from_str(s)
        .or_else(|_| Decimal::from_scientific(s))
        .map(|d| d.normalize())
        .map_err(|_| format!("{s:?} is not a number Tally can represent exactly"))
}

/// Writes a decimal as a JSON number: integers stay exact, fractions become
/// the nearest double.
pub fn decimal_to_json(d: Decimal) -> Value {
    let d = d.normalize();
    if d.scale() == 0
        && let Ok(i) = i64::try_from(d)
    {
        return Value::from(i);
    }
    f64::try_from(d)
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_numbers_and_numeric_strings_exactly() {
        assert_eq!(decimal_from_json(&json!(3)).unwrap(), Decimal::from(3));
        assert_eq!(
            decimal_from_json(&json!("18446744073709551615"))
                .unwrap()
                .to_string(),
            "18446744073709551615"
        );
        assert_eq!(decimal_from_json(&json!(0.1)).unwrap().to_string(), "0.1");
        assert_eq!(
            decimal_from_json(&json!("1e3")).unwrap(),
            Decimal::from(1000)
        );
        assert_eq!(
            decimal_from_json(&json!(" 2.50 ")).unwrap().to_string(),
            "2.5"
        );
        assert!(decimal_from_json(&json!("ten")).is_err());
        assert!(decimal_from_json(&json!(true)).is_err());
        assert!(decimal_from_json(&json!("")).is_err());
    }

    #[test]
    fn writes_integers_exactly() {
        assert_eq!(
            decimal_to_json(Decimal::from(9_007_199_254_740_993_i64)),
            json!(9_007_199_254_740_993_i64)
        );
        assert_eq!(decimal_to_json(Decimal::new(25, 1)), json!(2.5));
    }
}
