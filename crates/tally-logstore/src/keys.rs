//! Key layouts of the embedded log store. Every key of per-instance data
//! starts with `project 0x00 instance 0x00` (names never hold NUL), so a
//! prefix scan never crosses into another project's or instance's keys.
//!
//! ```text
//! blocks     prefix · block u64 BE                 → block (block.rs)
//! times      prefix · flip(max ns) u64 BE · block  → min ns i64 LE · raw u32 LE
//!                                                    · stored u32 LE · lines u32 LE
//! ids        prefix · record id                    → block u64 BE
//! idblocks   prefix · block u64 BE                 → record ids, NUL-separated
//! instances  project 0x00 instance                 → newest ns i64 LE · workload
//! meta       "totals"                              → next block, raw, stored,
//!                                                    lines: 4 × u64 LE
//! ```
//!
//! `flip` turns an i64 into a u64 that sorts like it (sign bit flipped).

pub(crate) fn prefix(project: &str, instance: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(project.len() + instance.len() + 2);
    k.extend_from_slice(project.as_bytes());
    k.push(0);
    k.extend_from_slice(instance.as_bytes());
    k.push(0);
    k
}

pub(crate) fn project_prefix(project: &str) -> Vec<u8> {
    let mut k = project.as_bytes().to_vec();
    k.push(0);
    k
}

pub(crate) fn flip(t: i64) -> u64 {
    (t as u64) ^ (1 << 63)
}

pub(crate) fn unflip(u: u64) -> i64 {
    (u ^ (1 << 63)) as i64
}

pub(crate) fn block_key(prefix: &[u8], block: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&block.to_be_bytes());
    k
}

pub(crate) fn time_key(prefix: &[u8], max_nanos: i64, block: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&flip(max_nanos).to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k
}

pub(crate) fn id_key(prefix: &[u8], id: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn instance_key(project: &str, instance: &str) -> Vec<u8> {
    let mut k = project_prefix(project);
    k.extend_from_slice(instance.as_bytes());
    k
}

/// Splits an `instances` key into (project, instance).
pub(crate) fn split_instance_key(key: &[u8]) -> Option<(String, String)> {
    let at = key.iter().position(|b| *b == 0)?;
    Some((
        String::from_utf8(key[..at].to_vec()).ok()?,
        String::from_utf8(key[at + 1..].to_vec()).ok()?,
    ))
}

/// A `times` entry's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub min_nanos: i64,
    pub raw: u32,
    pub stored: u32,
    pub lines: u32,
}

impl TimeEntry {
    pub(crate) fn encode(&self) -> [u8; 20] {
        let mut v = [0u8; 20];
        v[..8].copy_from_slice(&self.min_nanos.to_le_bytes());
        v[8..12].copy_from_slice(&self.raw.to_le_bytes());
        v[12..16].copy_from_slice(&self.stored.to_le_bytes());
        v[16..20].copy_from_slice(&self.lines.to_le_bytes());
        v
    }

    pub(crate) fn decode(v: &[u8]) -> Option<TimeEntry> {
        Some(TimeEntry {
            min_nanos: i64::from_le_bytes(v.get(..8)?.try_into().ok()?),
            raw: u32::from_le_bytes(v.get(8..12)?.try_into().ok()?),
            stored: u32::from_le_bytes(v.get(12..16)?.try_into().ok()?),
            lines: u32::from_le_bytes(v.get(16..20)?.try_into().ok()?),
        })
    }
}

/// (max ns, block) of a `times` key under `prefix_len` bytes of prefix.
pub(crate) fn split_time_key(key: &[u8], prefix_len: usize) -> Option<(i64, u64)> {
    let rest = key.get(prefix_len..)?;
    Some((
        unflip(u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)),
        u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_sorts_like_i64() {
        let mut ts = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        ts.reverse();
        let mut flipped: Vec<u64> = ts.iter().map(|t| flip(*t)).collect();
        flipped.sort();
        let back: Vec<i64> = flipped.into_iter().map(unflip).collect();
        assert_eq!(back, vec![i64::MIN, -5, -1, 0, 1, 7, i64::MAX]);
    }

    #[test]
    fn a_prefix_never_covers_another_instance() {
        // "a" / "b-1" and "a" / "b" must not share a prefix scan.
        let p = prefix("a", "b");
        assert!(!block_key(&prefix("a", "b-1"), 0).starts_with(&p));
        assert!(!block_key(&prefix("ab", ""), 0).starts_with(&p));
    }
}
