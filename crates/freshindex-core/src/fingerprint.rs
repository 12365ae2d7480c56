//! BLAKE3 fingerprints of content, specs and rows.

use std::fmt;
use std::str::FromStr;

/// A 256-bit BLAKE3 digest. Used for content hashes, memo-cache keys, row fingerprints and
/// spec fingerprints.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl std::hash::Hash for Fingerprint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The digest is already uniformly random: 64 of its bits are a perfect hash.
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// A hasher for maps keyed by [`Fingerprint`]: takes the fingerprint's own bits instead of
/// hashing them again.
#[derive(Clone, Copy, Debug, Default)]
pub struct FpHasher(u64);

impl std::hash::Hasher for FpHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for other key types; FNV-1a keeps it correct.
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// A hash map keyed by fingerprints.
pub type FpMap<V> =
    std::collections::HashMap<Fingerprint, V, std::hash::BuildHasherDefault<FpHasher>>;

impl Fingerprint {
    /// Fingerprint of one byte string.
    pub fn of(bytes: &[u8]) -> Self {
        Fingerprint(*blake3::hash(bytes).as_bytes())
    }

    /// Starts a fingerprint over several fields; see [`Fingerprinter`].
    pub fn builder(domain: &str) -> Fingerprinter {
        Fingerprinter::new(domain)
    }

    /// The digest as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        self.hex_prefix(32)
    }

    /// The first `bytes` bytes of the digest as lowercase hex.
    pub fn hex_prefix(&self, bytes: usize) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(bytes * 2);
        for b in &self.0[..bytes.min(32)] {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    /// Builds a fingerprint from a stored 32-byte slice.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Fingerprint)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 || !s.is_ascii() {
            return Err(format!("fingerprint `{s}` is not 64 hex characters"));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("fingerprint `{s}` is not hex"))?;
        }
        Ok(Fingerprint(out))
    }
}

/// Hashes a sequence of length-prefixed fields under a domain label, so that
/// `("ab", "c")` and `("a", "bc")` never collide and fingerprints of different kinds never do.
#[derive(Clone)]
pub struct Fingerprinter(blake3::Hasher);

impl Fingerprinter {
    fn new(domain: &str) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&(domain.len() as u64).to_le_bytes());
        h.update(domain.as_bytes());
        Fingerprinter(h)
    }

    /// Adds one field.
    pub fn field(mut self, bytes: &[u8]) -> Self {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// Adds one string field.
    pub fn str(self, s: &str) -> Self {
        self.field(s.as_bytes())
    }

    /// Adds one integer field.
    pub fn u64(self, v: u64) -> Self {
        self.field(&v.to_le_bytes())
    }

    /// Adds another fingerprint as a field.
    pub fn fp(self, fp: &Fingerprint) -> Self {
        self.field(&fp.0)
    }

    /// The digest.
    pub fn finish(self) -> Fingerprint {
        Fingerprint(*self.0.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_length_prefixed() {
        let a = Fingerprint::builder("t").str("ab").str("c").finish();
        let b = Fingerprint::builder("t").str("a").str("bc").finish();
        assert_ne!(a, b);
        let c = Fingerprint::builder("u").str("ab").str("c").finish();
        assert_ne!(a, c);
    }

    #[test]
    fn hex_round_trips() {
        let a = Fingerprint::of(b"hello");
        assert_eq!(a.to_hex().parse::<Fingerprint>(), Ok(a));
        assert!("zz".parse::<Fingerprint>().is_err());
    }
}
