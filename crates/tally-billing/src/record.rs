//! The records a forwarder sends: one per (meter, account, window,
//! dimension values, revision), and their deterministic `uniqueId`.

use std::collections::BTreeMap;

use jiff::Timestamp;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a record is about. Its revisions are the successive corrections of
/// one window total.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordKey {
    /// The provider's meter api name.
    pub meter_api_name: String,
    /// The window's start.
    pub window_start: Timestamp,
    /// The provider's customer id (the BillingAccount's uid).
    pub customer_id: String,
    /// The meter's group values.
    pub dimensions: BTreeMap<String, String>,
}

/// Why bytes are not a record key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed record key: {0}")]
pub struct KeyError(&'static str);

impl RecordKey {
    /// The deterministic id of revision `revision` of this record: the first
    /// 128 bits of SHA-256 over the key's canonical bytes and the revision,
    /// in hex. The same inputs give the same id in every process and release.
    pub fn unique_id(&self, revision: u32) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"tally-billing/v1\0");
        hasher.update(self.encode());
        hasher.update(revision.to_be_bytes());
        let digest = hasher.finalize();
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The canonical bytes, ordered by meter, then window, then account:
    /// `meter NUL window(i64 BE, sign flipped) customer NUL dimensions-json`.
    /// Names must not contain NUL (see [`RecordKey::is_encodable`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = window_prefix(&self.meter_api_name, self.window_start);
        out.extend_from_slice(self.customer_id.as_bytes());
        out.push(0);
        // Serialising a map of strings cannot fail.
        out.extend_from_slice(&serde_json::to_vec(&self.dimensions).unwrap_or_default());
        out
    }

    /// Whether meter and customer names can be encoded (no NUL byte).
    pub fn is_encodable(&self) -> bool {
        !self.meter_api_name.contains('\0') && !self.customer_id.contains('\0')
    }

    /// The inverse of [`RecordKey::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, KeyError> {
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| KeyError("not UTF-8"))
        };
        let nul = bytes
            .iter()
            .position(|b| *b == 0)
            .ok_or(KeyError("no meter"))?;
        let meter_api_name = text(&bytes[..nul])?;
        let rest = &bytes[nul + 1..];
        let window: [u8; 8] = rest
            .get(..8)
            .and_then(|w| w.try_into().ok())
            .ok_or(KeyError("no window"))?;
        let window_ms = (u64::from_be_bytes(window) ^ (1 << 63)) as i64;
        let window_start =
            Timestamp::from_millisecond(window_ms).map_err(|_| KeyError("window out of range"))?;
        let rest = &rest[8..];
        let nul = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(KeyError("no customer"))?;
        let customer_id = text(&rest[..nul])?;
        let dimensions =
            serde_json::from_slice(&rest[nul + 1..]).map_err(|_| KeyError("bad dimensions"))?;
        Ok(RecordKey {
            meter_api_name,
            window_start,
            customer_id,
            dimensions,
        })
    }
}

/// The key prefix shared by every record of one meter and window.
pub(crate) fn window_prefix(meter_api_name: &str, window_start: Timestamp) -> Vec<u8> {
    let mut out = Vec::with_capacity(meter_api_name.len() + 40);
    out.extend_from_slice(meter_api_name.as_bytes());
    out.push(0);
    let ms = window_start.as_millisecond() as u64 ^ (1 << 63);
    out.extend_from_slice(&ms.to_be_bytes());
    out
}

/// One record as queued, provider-neutral; each provider's encoder maps it
/// to its own wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    /// `RecordKey::unique_id(revision)`.
    pub unique_id: String,
    /// The provider's customer id.
    pub customer_id: String,
    /// The provider's meter api name.
    pub meter_api_name: String,
    /// The value: the window's total for revision 0, the difference to what
    /// was sent before for later revisions (may be negative).
    pub meter_value: Decimal,
    /// The window's start, in Unix milliseconds.
    pub window_start_ms: i64,
    /// The window's end, in Unix milliseconds.
    pub window_end_ms: i64,
    /// The meter's group values.
    pub dimensions: BTreeMap<String, String>,
    /// The revision (0 = first send).
    pub revision: u32,
}

impl UsageRecord {
    /// The key of the record this is a revision of.
    pub fn key(&self) -> Result<RecordKey, KeyError> {
        Ok(RecordKey {
            meter_api_name: self.meter_api_name.clone(),
            window_start: Timestamp::from_millisecond(self.window_start_ms)
                .map_err(|_| KeyError("window out of range"))?,
            customer_id: self.customer_id.clone(),
            dimensions: self.dimensions.clone(),
        })
    }

    /// Revision `revision` of `key`, carrying `value`.
    pub fn new(key: &RecordKey, window_end: Timestamp, revision: u32, value: Decimal) -> Self {
        UsageRecord {
            unique_id: key.unique_id(revision),
            customer_id: key.customer_id.clone(),
            meter_api_name: key.meter_api_name.clone(),
            meter_value: value,
            window_start_ms: key.window_start.as_millisecond(),
            window_end_ms: window_end.as_millisecond(),
            dimensions: key.dimensions.clone(),
            revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(meter: &str, window_ms: i64, customer: &str, dims: &[(&str, &str)]) -> RecordKey {
        RecordKey {
            meter_api_name: meter.into(),
            window_start: Timestamp::from_millisecond(window_ms).unwrap(),
            customer_id: customer.into(),
            dimensions: dims
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn unique_ids_are_deterministic_and_distinct() {
        let a = key("m", 1_700_000_040_000, "c", &[("region", "eu")]);
        assert_eq!(a.unique_id(0), a.clone().unique_id(0));
        assert_eq!(a.unique_id(0).len(), 32);
        let variants = [
            key("m2", 1_700_000_040_000, "c", &[("region", "eu")]),
            key("m", 1_700_000_100_000, "c", &[("region", "eu")]),
            key("m", 1_700_000_040_000, "c2", &[("region", "eu")]),
            key("m", 1_700_000_040_000, "c", &[("region", "us")]),
            key("m", 1_700_000_040_000, "c", &[]),
        ];
        for other in &variants {
            assert_ne!(a.unique_id(0), other.unique_id(0), "{other:?}");
        }
        assert_ne!(a.unique_id(0), a.unique_id(1));
        // Ambiguous concatenations stay distinct.
        assert_ne!(
            key("ab", 0, "c", &[]).unique_id(0),
            key("a", 0, "bc", &[]).unique_id(0)
        );
    }

    #[test]
    fn unique_id_is_pinned() {
        // If this changes, every uniqueId ever sent changes: a restarted
        // forwarder would double-count at the provider.
        let k = key(
            "meter-uid",
            1_735_689_600_000,
            "account-uid",
            &[("region", "eu")],
        );
        let expected: String = {
            let mut h = Sha256::new();
            h.update(b"tally-billing/v1\0");
            h.update(b"meter-uid\0");
            h.update(((1_735_689_600_000i64 as u64) ^ (1 << 63)).to_be_bytes());
            h.update(b"account-uid\0{\"region\":\"eu\"}");
            h.update(3u32.to_be_bytes());
            h.finalize()[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        assert_eq!(k.unique_id(3), expected);
    }

    proptest! {
        #[test]
        fn keys_round_trip_and_sort_by_meter_then_window(
            meter in "[a-z0-9-]{1,12}", customer in "[a-z0-9-]{0,12}",
            w1 in -1_000_000_000_000i64..4_000_000_000_000, w2 in -1_000_000_000_000i64..4_000_000_000_000,
            dims in proptest::collection::btree_map("[a-z]{1,5}", "[ -~]{0,8}", 0..4),
        ) {
            let a = RecordKey {
                meter_api_name: meter.clone(),
                window_start: Timestamp::from_millisecond(w1).unwrap(),
                customer_id: customer.clone(),
                dimensions: dims.clone(),
            };
            prop_assert_eq!(RecordKey::decode(&a.encode()).unwrap(), a.clone());
            let b = RecordKey { window_start: Timestamp::from_millisecond(w2).unwrap(), ..a.clone() };
            if w1 != w2 {
                prop_assert_eq!(a.encode().cmp(&b.encode()), w1.cmp(&w2));
            }
            prop_assert!(a.encode().starts_with(&window_prefix(&meter, a.window_start)));
        }
    }
}
