//! Fingerprints of (document, heads) over buckets of the key space, kept up to date on every
//! write so that a digest is never recomputed by a scan.
//!
//! A document's bucket is the first [`BUCKET_HEX_DIGITS`] hex digits of SHA-256 of its key,
//! so buckets are the same on every node whatever keys they hold. A bucket at depth `d` (its
//! prefix has `d` digits) aggregates the `16^(3-d)` leaves under it: the count of documents
//! and the XOR of their fingerprints, SHA-256 of the key and the sorted heads. Two nodes whose
//! aggregates agree for a bucket hold the same documents at the same heads there (up to a hash
//! collision). Aggregates for every depth are kept: 16 + 256 + 4096 entries.

use automerge::ChangeHash;

/// Hex digits of a leaf bucket's prefix.
pub const BUCKET_HEX_DIGITS: usize = 3;
/// Leaf buckets of the digest.
pub const LEAVES: usize = 1 << (4 * BUCKET_HEX_DIGITS);

pub type Fingerprint = [u8; 32];

/// The leaf bucket of a document key.
pub fn leaf_of(doc_key: &[u8]) -> usize {
    let digest = ring::digest::digest(&ring::digest::SHA256, doc_key);
    let bytes = digest.as_ref();
    (usize::from(bytes[0]) << 4) | (usize::from(bytes[1]) >> 4)
}

/// The fingerprint of a document at `heads` (any order).
pub fn fingerprint(doc_key: &[u8], heads: &[ChangeHash]) -> Fingerprint {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort_unstable();
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(doc_key);
    context.update(&[0]);
    for head in sorted {
        context.update(&head.0);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Aggregate {
    pub count: u64,
    pub fingerprint: Fingerprint,
}

impl Aggregate {
    fn toggle(&mut self, fingerprint: &Fingerprint, add: bool) {
        for (mine, theirs) in self.fingerprint.iter_mut().zip(fingerprint) {
            *mine ^= theirs;
        }
        if add {
            self.count += 1;
        } else {
            self.count = self.count.saturating_sub(1);
        }
    }
}

/// Aggregates at every depth, indexed by depth then bucket number.
#[derive(Debug, Clone)]
pub struct DigestTree {
    levels: [Vec<Aggregate>; BUCKET_HEX_DIGITS],
}

impl Default for DigestTree {
    fn default() -> Self {
        Self {
            levels: std::array::from_fn(|depth| vec![Aggregate::default(); 1 << (4 * (depth + 1))]),
        }
    }
}

impl DigestTree {
    /// Records that `doc_key` went from `old` heads (empty: absent) to `new` heads.
    pub fn update(&mut self, doc_key: &[u8], old: &[ChangeHash], new: &[ChangeHash]) {
        if old == new {
            return;
        }
        let leaf = leaf_of(doc_key);
        assert!(leaf < LEAVES);
        if !old.is_empty() {
            let print = fingerprint(doc_key, old);
            self.toggle(leaf, &print, false);
        }
        if !new.is_empty() {
            let print = fingerprint(doc_key, new);
            self.toggle(leaf, &print, true);
        }
    }

    fn toggle(&mut self, leaf: usize, print: &Fingerprint, add: bool) {
        for depth in 0..BUCKET_HEX_DIGITS {
            let bucket = leaf >> (4 * (BUCKET_HEX_DIGITS - 1 - depth));
            self.levels[depth][bucket].toggle(print, add);
        }
    }

    /// The aggregate of the bucket named by a hex prefix of 1 to 3 digits.
    pub fn get(&self, prefix: &str) -> Option<Aggregate> {
        let (depth, bucket) = parse_prefix(prefix)?;
        self.levels[depth].get(bucket).copied()
    }
}

/// Depth index and bucket number of a hex prefix of 1 to [`BUCKET_HEX_DIGITS`] digits.
pub fn parse_prefix(prefix: &str) -> Option<(usize, usize)> {
    if prefix.is_empty() || prefix.len() > BUCKET_HEX_DIGITS {
        return None;
    }
    let bucket = usize::from_str_radix(prefix, 16).ok()?;
    Some((prefix.len() - 1, bucket))
}

/// The hex prefix of a leaf bucket.
pub fn leaf_prefix(leaf: usize) -> String {
    format!("{leaf:03x}")
}

/// The sixteen children of a bucket prefix (or the top level for an empty prefix).
pub fn children(prefix: &str) -> Vec<String> {
    (0..16).map(|digit| format!("{prefix}{digit:x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_follow_updates_and_agree_regardless_of_order() {
        let heads = |n: u8| vec![ChangeHash([n; 32])];
        let mut one = DigestTree::default();
        let mut two = DigestTree::default();
        one.update(b"c/1", &[], &heads(1));
        one.update(b"c/2", &[], &heads(2));
        one.update(b"c/1", &heads(1), &heads(3));
        two.update(b"c/2", &[], &heads(2));
        two.update(b"c/1", &[], &heads(3));
        for prefix in children("") {
            assert_eq!(one.get(&prefix), two.get(&prefix));
        }
        let leaf = leaf_prefix(leaf_of(b"c/1"));
        assert_eq!(
            one.get(&leaf[..1]).unwrap().count,
            one.get(&leaf[..1]).unwrap().count
        );
        two.update(b"c/1", &heads(3), &heads(4));
        assert_ne!(one.get(&leaf), two.get(&leaf));
        assert_ne!(one.get(&leaf[..1]), two.get(&leaf[..1]));
        assert!(
            parse_prefix("").is_none()
                && parse_prefix("abcd").is_none()
                && parse_prefix("g").is_none()
        );
    }
}
