//! The built-in model needs no download: it hashes lowercase words, word bigrams and character
//! trigrams of words (with boundary marks, so prefixes and suffixes count) into 384 signed
//! buckets and L2-normalises the sum. It is deterministic across runs and machines and fast
//! (a few microseconds per chunk), and good enough for keyword-ish semantic search; real
//! transformer models plug into the same trait.

use super::{BUILTIN_DIMENSION, Embedder};

/// The built-in hashed n-gram embedder.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuiltinEmbedder;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[inline]
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    // Final avalanche so that the low bits used for the bucket are well mixed.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

#[inline]
fn add(v: &mut [f32; BUILTIN_DIMENSION], h: u64, weight: f32) {
    let bucket = (h % BUILTIN_DIMENSION as u64) as usize;
    v[bucket] += if h >> 63 == 0 { weight } else { -weight };
}

impl BuiltinEmbedder {
    /// Embeds one text.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = [0f32; BUILTIN_DIMENSION];
        let lower = text.to_lowercase();
        let mut prev: Option<u64> = None;
        let mut marked = Vec::with_capacity(64);
        for word in lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            let wh = fnv(1, word.as_bytes());
            add(&mut v, wh, 1.0);
            if let Some(p) = prev {
                let mut pair = [0u8; 16];
                pair[..8].copy_from_slice(&p.to_le_bytes());
                pair[8..].copy_from_slice(&wh.to_le_bytes());
                add(&mut v, fnv(2, &pair), 0.5);
            }
            prev = Some(wh);
            marked.clear();
            marked.push(b'<');
            marked.extend_from_slice(word.as_bytes());
            marked.push(b'>');
            if marked.len() > 3 {
                for tri in marked.windows(3) {
                    add(&mut v, fnv(3, tri), 0.35);
                }
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            for x in &mut v {
                *x /= norm;
            }
        }
        v.to_vec()
    }
}

impl Embedder for BuiltinEmbedder {
    fn dimension(&self) -> usize {
        BUILTIN_DIMENSION
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_normalised_and_meaningful() {
        let e = BuiltinEmbedder;
        let a = e.embed_one("Rotating API keys every ninety days");
        assert_eq!(a.len(), BUILTIN_DIMENSION);
        assert_eq!(a, e.embed_one("Rotating API keys every ninety days"));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        let q = e.embed_one("how do I rotate api keys");
        let other = e.embed_one("The cafeteria serves soup on Tuesdays");
        assert!(dot(&a, &q) > dot(&other, &q) + 0.1);
        assert!(e.embed_one("").iter().all(|x| *x == 0.0));
    }
}
