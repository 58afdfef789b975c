//! Bounds on every string an outside caller can hand the ledger.
//!
//! A stored event's attributes become parts of index keys (the dedupe key
//! holds `source` and `id`, the dictionary holds subjects and dimension
//! values), and index keys have a hard size limit in every store. These
//! bounds keep every key far below it, so an oversized field is refused at
//! validation with a reason naming the field and the limit, never found by
//! the store.
//!
//! **Invariant:** `MAX_ATTRIBUTE_BYTES` × 2 (a dedupe key) and
//! `MAX_GROUP_BYTES` (a dictionary entry) stay far below 65,535 bytes, the
//! smallest key limit of the stores Tally runs on.

use crate::event::{FieldError, error_code, field_error};

/// `id`, `source`, `subject`, `type`, `datacontenttype`, `dataschema`: at
/// most this many bytes each.
pub const MAX_ATTRIBUTE_BYTES: usize = 1024;

/// A string extension attribute, or a dimension value an event carries
/// (`data.dimensions.<name>`, or what a meter's JSONPath selects): at most
/// this many bytes.
pub const MAX_DIMENSION_VALUE_BYTES: usize = 4096;

/// All dimension values one event contributes to one meter, together.
pub const MAX_GROUP_BYTES: usize = 16 * 1024;

/// The most dimensions (`measurement.dimensions` plus `event.dimensions`)
/// one meter may declare.
pub const MAX_METER_DIMENSIONS: usize = 32;

/// A dimension's name (a meter's `groupBy` key): at most this many bytes.
/// Names are query parameters, CSV headers and parts of stored keys.
pub const MAX_DIMENSION_NAME_BYTES: usize = 256;

/// The smallest key limit of the stores Tally runs on.
const STORE_KEY_LIMIT: usize = 65_535;

// The invariant above, checked when the crate is compiled.
const _: () = assert!(2 * MAX_ATTRIBUTE_BYTES + 16 < STORE_KEY_LIMIT / 4);
const _: () = assert!(MAX_GROUP_BYTES + 4 * MAX_METER_DIMENSIONS + 16 < STORE_KEY_LIMIT / 2);

/// `field` is refused with [`error_code::VALUE_TOO_LONG`] if `value` is
/// longer than `max` bytes.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        return Err(field_error(
            field,
            error_code::VALUE_TOO_LONG,
            format!("is {} bytes long; the limit is {max} bytes", value.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_field_and_the_limit() {
        assert!(check_len("id", &"x".repeat(1024), MAX_ATTRIBUTE_BYTES).is_ok());
        let e = check_len("id", &"x".repeat(1025), MAX_ATTRIBUTE_BYTES).unwrap_err();
        assert_eq!(e.field, "id");
        assert_eq!(e.code, error_code::VALUE_TOO_LONG);
        assert!(
            e.reason.contains("1025") && e.reason.contains("1024"),
            "{}",
            e.reason
        );
    }
}
