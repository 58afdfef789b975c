//! Mergeable aggregation states.
//!
//! A state is what a rollup bucket keeps. Merging two states gives the state
//! of the union of their events, whatever order events arrived in, so minute
//! buckets combine into hours, days and any query window exactly.

use std::collections::BTreeSet;

use rust_decimal::Decimal;
use tally_model::Aggregation;

use crate::extract::SampleValue;

/// Why two states could not be combined, or a stored state not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("sum overflows the exact decimal range (about 7.9e28)")]
    Overflow,
    #[error("cannot merge a {0} state with a {1} state")]
    Mismatch(&'static str, &'static str),
    #[error("corrupt rollup state: {0}")]
    Corrupt(&'static str),
    #[error("a {0} state cannot take an event back out; rebuild it from the log")]
    NotInvertible(&'static str),
}

/// The state of one aggregation over a set of events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AggState {
    /// The sum, and how many events it covers (so a bucket emptied by
    /// voiding is recognised and removed).
    Sum {
        sum: Decimal,
        count: u64,
    },
    Count(u64),
    UniqueCount(BTreeSet<String>),
    Avg {
        sum: Decimal,
        count: u64,
    },
    Min(Decimal),
    Max(Decimal),
    /// The value of the event with the latest time; among equal times, the
    /// one stored last (highest log sequence).
    Latest {
        time_ns: i128,
        seq: u64,
        value: Decimal,
    },
}

impl AggState {
    /// The state of a single event. `None` when the sample does not carry
    /// what the aggregation needs (callers check this with [`crate::CompiledMeter`]).
    pub fn of_sample(
        aggregation: Aggregation,
        value: &SampleValue,
        time_ns: i128,
        seq: u64,
    ) -> Option<AggState> {
        Some(match (aggregation, value) {
            (Aggregation::Count, _) => AggState::Count(1),
            (Aggregation::UniqueCount, SampleValue::Text(s)) => {
                AggState::UniqueCount(BTreeSet::from([s.clone()]))
            }
            (Aggregation::Sum, SampleValue::Number(d)) => AggState::Sum { sum: *d, count: 1 },
            (Aggregation::Avg, SampleValue::Number(d)) => AggState::Avg { sum: *d, count: 1 },
            (Aggregation::Min, SampleValue::Number(d)) => AggState::Min(*d),
            (Aggregation::Max, SampleValue::Number(d)) => AggState::Max(*d),
            (Aggregation::Latest, SampleValue::Number(d)) => AggState::Latest {
                time_ns,
                seq,
                value: *d,
            },
            _ => return None,
        })
    }

    fn name(&self) -> &'static str {
        match self {
            AggState::Sum { .. } => "SUM",
            AggState::Count(_) => "COUNT",
            AggState::UniqueCount(_) => "UNIQUE_COUNT",
            AggState::Avg { .. } => "AVG",
            AggState::Min(_) => "MIN",
            AggState::Max(_) => "MAX",
            AggState::Latest { .. } => "LATEST",
        }
    }

    /// Folds `other` into `self`.
    pub fn merge(&mut self, other: &AggState) -> Result<(), StateError> {
        match (self, other) {
            (AggState::Sum { sum, count }, AggState::Sum { sum: s, count: c }) => {
                *sum = sum.checked_add(*s).ok_or(StateError::Overflow)?;
                *count += c;
            }
            (AggState::Count(a), AggState::Count(b)) => *a += b,
            (AggState::UniqueCount(a), AggState::UniqueCount(b)) => a.extend(b.iter().cloned()),
            (AggState::Avg { sum, count }, AggState::Avg { sum: s, count: c }) => {
                *sum = sum.checked_add(*s).ok_or(StateError::Overflow)?;
                *count += c;
            }
            (AggState::Min(a), AggState::Min(b)) => *a = (*a).min(*b),
            (AggState::Max(a), AggState::Max(b)) => *a = (*a).max(*b),
            (
                AggState::Latest {
                    time_ns,
                    seq,
                    value,
                },
                AggState::Latest {
                    time_ns: t,
                    seq: s,
                    value: v,
                },
            ) => {
                if (*t, *s) > (*time_ns, *seq) {
                    (*time_ns, *seq, *value) = (*t, *s, *v);
                }
            }
            (a, b) => return Err(StateError::Mismatch(a.name(), b.name())),
        }
        Ok(())
    }

    /// Takes the events of `other` back out of `self` (voiding). Only SUM,
    /// COUNT and AVG can; the others answer [`StateError::NotInvertible`].
    /// Returns whether no event is left, in which case the bucket should go.
    pub fn retract(&mut self, other: &AggState) -> Result<bool, StateError> {
        let fewer = |n: &mut u64, c: u64| {
            *n = n.checked_sub(c).ok_or(StateError::Corrupt(
                "retracting more events than a state covers",
            ))?;
            Ok::<bool, StateError>(*n == 0)
        };
        match (self, other) {
            (AggState::Sum { sum, count }, AggState::Sum { sum: s, count: c })
            | (AggState::Avg { sum, count }, AggState::Avg { sum: s, count: c }) => {
                *sum = sum.checked_sub(*s).ok_or(StateError::Overflow)?;
                fewer(count, *c)
            }
            (AggState::Count(n), AggState::Count(c)) => fewer(n, *c),
            (a, b) if a.name() != b.name() => Err(StateError::Mismatch(a.name(), b.name())),
            (a, _) => Err(StateError::NotInvertible(a.name())),
        }
    }

    /// Whether [`AggState::retract`] works for this aggregation.
    pub fn invertible(aggregation: Aggregation) -> bool {
        matches!(
            aggregation,
            Aggregation::Sum | Aggregation::Count | Aggregation::Avg
        )
    }

    /// The meter's value for the events this state covers.
    pub fn result(&self) -> Decimal {
        match self {
            AggState::Sum { sum, .. } => *sum,
            AggState::Min(d) | AggState::Max(d) => *d,
            AggState::Latest { value, .. } => *value,
            AggState::Count(n) => Decimal::from(*n),
            AggState::UniqueCount(set) => Decimal::from(set.len()),
            AggState::Avg { sum, count } => {
                if *count == 0 {
                    Decimal::ZERO
                } else {
                    (*sum / Decimal::from(*count)).normalize()
                }
            }
        }
    }

    /// A compact binary encoding for storage.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            AggState::Sum { sum, count } => {
                out.push(1);
                out.extend_from_slice(&sum.serialize());
                out.extend_from_slice(&count.to_be_bytes());
            }
            AggState::Count(n) => {
                out.push(2);
                out.extend_from_slice(&n.to_be_bytes());
            }
            AggState::UniqueCount(set) => {
                out.push(3);
                out.extend_from_slice(&(set.len() as u32).to_be_bytes());
                for s in set {
                    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
            }
            AggState::Avg { sum, count } => {
                out.push(4);
                out.extend_from_slice(&sum.serialize());
                out.extend_from_slice(&count.to_be_bytes());
            }
            AggState::Min(d) => {
                out.push(5);
                out.extend_from_slice(&d.serialize());
            }
            AggState::Max(d) => {
                out.push(6);
                out.extend_from_slice(&d.serialize());
            }
            AggState::Latest {
                time_ns,
                seq,
                value,
            } => {
                out.push(7);
                out.extend_from_slice(&time_ns.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&value.serialize());
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        self.encode(&mut out);
        out
    }

    /// Decodes what [`AggState::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<AggState, StateError> {
        let mut r = Reader(bytes);
        let state = match r.take::<1>()?[0] {
            1 => AggState::Sum {
                sum: r.decimal()?,
                count: u64::from_be_bytes(r.take()?),
            },
            2 => AggState::Count(u64::from_be_bytes(r.take()?)),
            3 => {
                let n = u32::from_be_bytes(r.take()?);
                let mut set = BTreeSet::new();
                for _ in 0..n {
                    let len = u32::from_be_bytes(r.take()?) as usize;
                    let raw = r.slice(len)?;
                    let s = std::str::from_utf8(raw).map_err(|_| StateError::Corrupt("utf-8"))?;
                    set.insert(s.to_owned());
                }
                AggState::UniqueCount(set)
            }
            4 => AggState::Avg {
                sum: r.decimal()?,
                count: u64::from_be_bytes(r.take()?),
            },
            5 => AggState::Min(r.decimal()?),
            6 => AggState::Max(r.decimal()?),
            7 => AggState::Latest {
                time_ns: i128::from_be_bytes(r.take()?),
                seq: u64::from_be_bytes(r.take()?),
                value: r.decimal()?,
            },
            _ => return Err(StateError::Corrupt("unknown tag")),
        };
        if !r.0.is_empty() {
            return Err(StateError::Corrupt("trailing bytes"));
        }
        Ok(state)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn slice(&mut self, n: usize) -> Result<&[u8], StateError> {
        if self.0.len() < n {
            return Err(StateError::Corrupt("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut out = [0; N];
        out.copy_from_slice(self.slice(N)?);
        Ok(out)
    }

    fn decimal(&mut self) -> Result<Decimal, StateError> {
        Ok(Decimal::deserialize(self.take()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sum(d: Decimal) -> AggState {
        AggState::Sum { sum: d, count: 1 }
    }

    fn fold(aggregation: Aggregation, values: &[i64]) -> Option<AggState> {
        let mut states = values.iter().enumerate().map(|(i, v)| {
            AggState::of_sample(
                aggregation,
                &SampleValue::Number(Decimal::from(*v)),
                0,
                i as u64,
            )
            .unwrap()
        });
        let mut acc = states.next()?;
        for s in states {
            acc.merge(&s).unwrap();
        }
        Some(acc)
    }

    proptest! {
        /// Taking events back out of an invertible state gives the state of
        /// the events that remain, and says when none remain.
        #[test]
        fn retracting_equals_folding_what_remains(
            values in prop::collection::vec(-1_000_000i64..1_000_000, 1..40),
            keep in prop::collection::vec(any::<bool>(), 40),
            which in 0usize..3,
        ) {
            let aggregation = [Aggregation::Sum, Aggregation::Count, Aggregation::Avg][which];
            let mut state = fold(aggregation, &values).unwrap();
            let mut remaining = Vec::new();
            let mut emptied = false;
            for (i, v) in values.iter().enumerate() {
                if keep[i] {
                    remaining.push(*v);
                } else {
                    let one = fold(aggregation, &[*v]).unwrap();
                    emptied = state.retract(&one).unwrap();
                }
            }
            match fold(aggregation, &remaining) {
                Some(expected) => {
                    prop_assert!(!emptied || remaining.is_empty());
                    prop_assert_eq!(state, expected);
                }
                None => prop_assert!(emptied),
            }
        }
    }

    #[test]
    fn only_sum_count_and_avg_can_retract() {
        for aggregation in [Aggregation::Min, Aggregation::Max, Aggregation::Latest] {
            let mut s = fold(aggregation, &[1, 2]).unwrap();
            let one = fold(aggregation, &[1]).unwrap();
            assert!(matches!(s.retract(&one), Err(StateError::NotInvertible(_))));
            assert!(!AggState::invertible(aggregation));
        }
        assert!(sum(Decimal::ONE).retract(&AggState::Count(1)).is_err());
    }

    fn states() -> impl Strategy<Value = AggState> {
        let dec = (any::<i64>(), 0u32..6).prop_map(|(m, s)| Decimal::new(m, s));
        prop_oneof![
            (dec.clone(), any::<u64>()).prop_map(|(sum, count)| AggState::Sum { sum, count }),
            any::<u32>().prop_map(|n| AggState::Count(n.into())),
            proptest::collection::btree_set("[a-c]{0,3}", 0..4).prop_map(AggState::UniqueCount),
            (dec.clone(), any::<u32>()).prop_map(|(sum, c)| AggState::Avg {
                sum,
                count: c.into()
            }),
            dec.clone().prop_map(AggState::Min),
            dec.clone().prop_map(AggState::Max),
            (any::<i64>(), any::<u64>(), dec).prop_map(|(t, seq, value)| AggState::Latest {
                time_ns: t.into(),
                seq,
                value
            }),
        ]
    }

    proptest! {
        #[test]
        fn encoding_round_trips(state in states()) {
            prop_assert_eq!(AggState::decode(&state.to_bytes()).unwrap(), state);
        }

        #[test]
        fn truncated_encodings_are_refused(state in states(), cut in 1usize..8) {
            let bytes = state.to_bytes();
            let cut = cut.min(bytes.len());
            prop_assert!(AggState::decode(&bytes[..bytes.len() - cut]).is_err());
        }
    }

    #[test]
    fn latest_prefers_later_time_then_later_seq() {
        let mut a = AggState::Latest {
            time_ns: 10,
            seq: 5,
            value: Decimal::ONE,
        };
        a.merge(&AggState::Latest {
            time_ns: 10,
            seq: 4,
            value: Decimal::TWO,
        })
        .unwrap();
        assert_eq!(a.result(), Decimal::ONE);
        a.merge(&AggState::Latest {
            time_ns: 11,
            seq: 1,
            value: Decimal::TEN,
        })
        .unwrap();
        assert_eq!(a.result(), Decimal::TEN);
    }

    #[test]
    fn merging_different_kinds_fails() {
        let mut a = AggState::Count(1);
        assert!(a.merge(&sum(Decimal::ONE)).is_err());
    }

    #[test]
    fn sums_stay_exact_past_f64() {
        let mut a = sum(Decimal::from(9_007_199_254_740_993_i64));
        a.merge(&sum(Decimal::ONE)).unwrap();
        assert_eq!(a.result().to_string(), "9007199254740994");
        let mut big = sum(Decimal::MAX);
        assert_eq!(big.merge(&sum(Decimal::ONE)), Err(StateError::Overflow));
    }
}
