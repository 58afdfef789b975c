//! In-memory filters of the keys a keyspace holds, in front of the writer's
//! point reads.
//!
//! Per event the writer asks the store whether its (source, id) was seen and
//! what each of its rollup buckets holds. Under a load of new ids and new
//! buckets almost every answer is "nothing", and a miss still searches every
//! memtable's skiplist and probes the tables' filters: a fifth of the
//! writer's time. A [`KnownKeys`] answers most misses from memory: when it
//! says a key is absent, it is (no false negatives), so the read is skipped;
//! when it says "maybe", the store is read as before. Answers therefore never
//! depend on the filter, only the cost does.
//!
//! No false negatives holds because every key the keyspace can hold is in
//! the filter: a key is added before it can be written (the dedupe filter
//! learns each key when the writer hands it to the tail; the rollup filter
//! each key the holder of the derived store's lock writes), and a scan adds
//! the keys that were there when the store opened. Until that scan has finished, the filter answers "maybe"
//! to everything. Removed keys stay in the filter (they only cost a read).
//!
//! The filter is a blocked Bloom filter (one 512-bit block per key, 8 bits
//! set in it; about 1–2 % false positives at 12 bits per key). When more
//! keys arrive than it was sized for, a layer twice as large is added, so
//! the false-positive rate stays bounded as the store grows, up to a memory
//! budget: a layer that would pass it is not added; the filter is
//! *saturated* instead (its layers freed) and answers "maybe" from then on,
//! so every read goes to the store and its own filters. Memory is bounded
//! by the budget, never by how many keys the store holds.

/// Bits of filter per key a layer is sized for.
const BITS_PER_KEY: usize = 12;
/// The smallest layer, in keys.
const MIN_CAPACITY: usize = 1 << 20;

/// Where the scan of the keys present at open stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scan {
    /// Keys before this one (exclusive; `None`: from the start) are in.
    From(Option<Vec<u8>>),
    Done,
}

struct Layer {
    blocks: Vec<[u64; 8]>,
    capacity: usize,
    len: usize,
}

impl Layer {
    fn new(capacity: usize) -> Layer {
        let blocks = (capacity * BITS_PER_KEY).div_ceil(512).max(1);
        Layer {
            blocks: vec![[0; 8]; blocks],
            capacity,
            len: 0,
        }
    }

    /// The block and the bit of each of its words for a hash.
    fn locate(&self, hash: u64) -> (usize, [u64; 8]) {
        let block = ((u128::from(hash) * self.blocks.len() as u128) >> 64) as usize;
        // Bits from a second, independent mix of the hash.
        let mut h = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        let mut bits = [0u64; 8];
        for bit in &mut bits {
            *bit = 1 << (h & 63);
            h >>= 6;
            if h == 0 {
                h = hash.rotate_right(17) | 1;
            }
        }
        (block, bits)
    }

    fn insert(&mut self, hash: u64) {
        let (block, bits) = self.locate(hash);
        for (word, bit) in self.blocks[block].iter_mut().zip(bits) {
            *word |= bit;
        }
        self.len += 1;
    }

    fn may_contain(&self, hash: u64) -> bool {
        let (block, bits) = self.locate(hash);
        self.blocks[block]
            .iter()
            .zip(bits)
            .all(|(word, bit)| word & bit != 0)
    }
}

/// A filter of the keys one keyspace holds; see the module docs.
pub(crate) struct KnownKeys {
    layers: Vec<Layer>,
    scan: Scan,
    hash: fn(&[u8]) -> u64,
    /// Most bytes the layers may take.
    budget: usize,
    saturated: bool,
}

impl KnownKeys {
    /// A filter sized for about `expected` keys (within `budget` bytes),
    /// whose scan has not begun. `hash` must spread keys evenly over 64
    /// bits.
    pub fn new(expected: usize, hash: fn(&[u8]) -> u64, budget: usize) -> KnownKeys {
        let mut known = KnownKeys {
            layers: Vec::new(),
            scan: Scan::From(None),
            hash,
            budget,
            saturated: false,
        };
        known.add_layer(expected.saturating_mul(2).max(MIN_CAPACITY));
        known
    }

    /// Adds a layer for `capacity` keys, or saturates the filter when it
    /// would pass the budget.
    fn add_layer(&mut self, capacity: usize) {
        let bytes = (capacity * BITS_PER_KEY).div_ceil(512).max(1) * 64;
        if self.bytes() + bytes > self.budget {
            self.saturated = true;
            self.layers = Vec::new();
            return;
        }
        self.layers.push(Layer::new(capacity));
    }

    pub fn insert(&mut self, key: &[u8]) {
        if self.saturated {
            return;
        }
        let hash = (self.hash)(key);
        let full = self
            .layers
            .last()
            .is_none_or(|layer| layer.len >= layer.capacity);
        if full {
            let capacity = self
                .layers
                .last()
                .map_or(MIN_CAPACITY, |layer| layer.capacity * 2);
            self.add_layer(capacity);
        }
        if let Some(layer) = self.layers.last_mut() {
            layer.insert(hash);
        }
    }

    /// Whether the budget was reached: the filter answers "maybe" for good.
    pub fn saturated(&self) -> bool {
        self.saturated
    }

    /// False only when the keyspace certainly does not hold `key`.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        if self.scan != Scan::Done || self.saturated {
            return true;
        }
        let hash = (self.hash)(key);
        self.layers.iter().any(|layer| layer.may_contain(hash))
    }

    pub fn scan(&self) -> &Scan {
        &self.scan
    }

    pub fn set_scan(&mut self, scan: Scan) {
        self.scan = scan;
    }

    /// Bytes of memory the filter holds.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.blocks.len() * 64).sum()
    }
}

/// The hash of a key that does not begin with one (a rollup key).
pub(crate) fn hash_key(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNBOUNDED: usize = usize::MAX / 2;

    fn ready(expected: usize) -> KnownKeys {
        let mut known = KnownKeys::new(expected, hash_key, UNBOUNDED);
        known.set_scan(Scan::Done);
        known
    }

    #[test]
    fn says_maybe_to_everything_until_the_scan_is_done() {
        let mut known = KnownKeys::new(10, hash_key, UNBOUNDED);
        assert!(known.may_contain(b"anything"));
        known.set_scan(Scan::Done);
        assert!(!known.may_contain(b"anything"));
    }

    #[test]
    fn false_positives_are_rare_and_layers_grow() {
        let mut known = ready(0);
        let n = 3 * MIN_CAPACITY;
        for i in 0..n as u64 {
            known.insert(&i.to_be_bytes());
        }
        assert!(known.layers.len() >= 2, "a full layer gets a successor");
        let false_positives = (n as u64..n as u64 + 100_000)
            .filter(|i| known.may_contain(&i.to_be_bytes()))
            .count();
        assert!(false_positives < 5_000, "{false_positives} of 100000");
    }

    #[test]
    fn a_filter_at_its_budget_saturates_and_says_maybe() {
        // Room for the first layer (1 Mi keys, 1.5 MiB), not a second.
        let mut known = KnownKeys::new(0, hash_key, 2 << 20);
        known.set_scan(Scan::Done);
        let first = Layer::new(MIN_CAPACITY).blocks.len() * 64;
        assert_eq!(known.bytes(), first);
        assert!(!known.may_contain(b"absent"));
        for i in 0..(MIN_CAPACITY + 1) as u64 {
            known.insert(&i.to_be_bytes());
        }
        assert!(known.saturated());
        assert_eq!(known.bytes(), 0);
        assert!(
            known.may_contain(b"absent"),
            "a saturated filter says maybe"
        );
        // Too small for even one layer: saturated from the start.
        let tiny = KnownKeys::new(0, hash_key, 1);
        assert!(tiny.saturated());
    }

    proptest! {
        #[test]
        fn never_forgets_a_key(keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..500)) {
            let mut known = ready(keys.len());
            for key in &keys {
                known.insert(key);
            }
            for key in &keys {
                prop_assert!(known.may_contain(key));
            }
        }
    }
}
