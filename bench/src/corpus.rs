//! The synthetic corpus: seeded Markdown documents of pseudo-words, and the edit applied to it.
//!
//! Everything is a pure function of the seed: the vocabulary, the pool of paragraphs shared
//! verbatim between documents, each document (from its own random stream, so a document's
//! content depends only on the seed and its number) and the edit.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result};

/// splitmix64: tiny, fast and good enough for generating text.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` and a stream number (independent streams for independent uses).
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0xD134_2543_DE82_EF95));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Shuffles `v` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Random streams.
const STREAM_VOCAB: u64 = 1;
const STREAM_POOL: u64 = 2;
const STREAM_EDIT: u64 = 3;
const STREAM_DOC: u64 = 1 << 32;

/// Words in the vocabulary.
const VOCABULARY: usize = 4000;
/// Paragraphs that documents share verbatim.
const SHARED_PARAGRAPHS: usize = 400;
/// Probability that a paragraph of a document comes from the shared pool.
const SHARED_PARAGRAPH_CHANCE: f64 = 0.08;
/// Standard closing sections (a heading and shared paragraphs) that many documents end with.
const FOOTERS: usize = 24;
/// Probability that a document ends with one of the standard closing sections.
const FOOTER_CHANCE: f64 = 0.3;
/// Document size bounds in bytes.
const MIN_DOC: usize = 2048;
const MAX_DOC: usize = 8192;

/// Folders per level (`dNN/dMM/`).
const FANOUT: usize = 20;

/// The vocabulary and shared text of a seed.
#[derive(Debug)]
pub struct Generator {
    seed: u64,
    words: Vec<String>,
    pool: Vec<String>,
    footers: Vec<String>,
}

impl Generator {
    /// Builds the vocabulary and the shared paragraphs of `seed`.
    pub fn new(seed: u64) -> Generator {
        const ONSETS: &[&str] = &[
            "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
            "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "qu", "sh", "st", "th", "tr", "",
        ];
        const VOWELS: &[&str] = &[
            "a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "io", "y",
        ];
        const CODAS: &[&str] = &[
            "", "", "", "", "n", "r", "s", "l", "t", "m", "x", "nd", "st", "ck", "ng",
        ];
        let mut rng = Rng::new(seed, STREAM_VOCAB);
        let mut seen = HashSet::new();
        let mut words = Vec::with_capacity(VOCABULARY);
        while words.len() < VOCABULARY {
            let syllables = [1, 2, 2, 2, 3, 3, 3, 4][rng.below(8)];
            let mut w = String::new();
            for _ in 0..syllables {
                w.push_str(ONSETS[rng.below(ONSETS.len())]);
                w.push_str(VOWELS[rng.below(VOWELS.len())]);
                if rng.chance(0.35) {
                    w.push_str(CODAS[rng.below(CODAS.len())]);
                }
            }
            if w.len() >= 2 && seen.insert(w.clone()) {
                words.push(w);
            }
        }
        let mut g = Generator {
            seed,
            words,
            pool: Vec::new(),
            footers: Vec::new(),
        };
        let mut rng = Rng::new(seed, STREAM_POOL);
        g.pool = (0..SHARED_PARAGRAPHS)
            .map(|_| g.paragraph(&mut rng))
            .collect();
        g.footers = (0..FOOTERS)
            .map(|_| {
                let mut s = format!("## {}", g.heading(&mut rng));
                for _ in 0..rng.between(2, 3) {
                    s.push_str("\n\n");
                    s.push_str(&g.pool[rng.below(g.pool.len())]);
                }
                s
            })
            .collect();
        g
    }

    /// A word, Zipf-like: a few words are very common, most are rare.
    fn word(&self, rng: &mut Rng) -> &str {
        let i = (rng.unit().powf(2.5) * self.words.len() as f64) as usize;
        &self.words[i.min(self.words.len() - 1)]
    }

    fn capitalized(&self, rng: &mut Rng, out: &mut String) {
        let w = self.word(rng);
        let mut chars = w.chars();
        if let Some(c) = chars.next() {
            out.extend(c.to_uppercase());
            out.push_str(chars.as_str());
        }
    }

    fn sentence(&self, rng: &mut Rng, out: &mut String) {
        let n = rng.between(5, 18);
        self.capitalized(rng, out);
        for i in 1..n {
            if i + 1 < n && rng.chance(0.08) {
                out.push(',');
            }
            out.push(' ');
            out.push_str(self.word(rng));
        }
        out.push(if rng.chance(0.05) { '?' } else { '.' });
    }

    /// A paragraph of 2 to 6 sentences.
    pub fn paragraph(&self, rng: &mut Rng) -> String {
        let mut s = String::new();
        for i in 0..rng.between(2, 6) {
            if i > 0 {
                s.push(' ');
            }
            self.sentence(rng, &mut s);
        }
        s
    }

    fn heading(&self, rng: &mut Rng) -> String {
        let mut s = String::new();
        self.capitalized(rng, &mut s);
        for _ in 1..rng.between(2, 5) {
            s.push(' ');
            s.push_str(self.word(rng));
        }
        s
    }

    fn body_paragraph(&self, rng: &mut Rng) -> String {
        if rng.chance(SHARED_PARAGRAPH_CHANCE) {
            self.pool[rng.below(self.pool.len())].clone()
        } else {
            self.paragraph(rng)
        }
    }

    /// Relative path of document number `i`.
    pub fn doc_path(i: usize) -> String {
        format!(
            "d{:02}/d{:02}/doc-{i:05}.md",
            i % FANOUT,
            (i / FANOUT) % FANOUT
        )
    }

    /// Document number `i`: a title, an introduction, `##` sections of paragraphs, sometimes a
    /// standard closing section; between 2 and 8 KB.
    pub fn document(&self, i: usize) -> String {
        let mut rng = Rng::new(self.seed, STREAM_DOC + i as u64);
        let target = rng.between(MIN_DOC, MAX_DOC);
        let footer = if rng.chance(FOOTER_CHANCE) {
            Some(self.footers[rng.below(self.footers.len())].as_str())
        } else {
            None
        };
        let budget = MAX_DOC - footer.map_or(0, |f| f.len() + 2) - 1;
        let goal = target.saturating_sub(footer.map_or(0, |f| f.len() + 2));
        let mut doc = format!(
            "# {}\n\n{}",
            self.heading(&mut rng),
            self.paragraph(&mut rng)
        );
        'sections: while doc.len() < goal {
            let block = format!("## {}", self.heading(&mut rng));
            if doc.len() + 2 + block.len() > budget {
                break;
            }
            doc.push_str("\n\n");
            doc.push_str(&block);
            for _ in 0..rng.between(1, 4) {
                let p = self.body_paragraph(&mut rng);
                if doc.len() + 2 + p.len() > budget {
                    break 'sections;
                }
                doc.push_str("\n\n");
                doc.push_str(&p);
                if doc.len() >= goal {
                    break 'sections;
                }
            }
        }
        if let Some(f) = footer {
            doc.push_str("\n\n");
            doc.push_str(f);
        }
        doc.push('\n');
        doc
    }

    /// Writes documents `0..n` under `root`; returns the total size in bytes.
    pub fn write_corpus(&self, root: &Path, n: usize) -> Result<u64> {
        let mut bytes = 0;
        for i in 0..n {
            bytes += self.write_doc(root, i)? as u64;
        }
        Ok(bytes)
    }

    fn write_doc(&self, root: &Path, i: usize) -> Result<usize> {
        let path = root.join(Self::doc_path(i));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let doc = self.document(i);
        std::fs::write(&path, &doc).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(doc.len())
    }

    /// Applies the edit scenario to a corpus of documents `0..n`: replaces one paragraph of
    /// `edit` documents with a new random paragraph, deletes `delete` other documents and adds
    /// `add` new ones. Returns the relative paths whose content is new (edited or added).
    pub fn apply_edit(
        &self,
        root: &Path,
        n: usize,
        edit: usize,
        delete: usize,
        add: usize,
    ) -> Result<Vec<String>> {
        let mut rng = Rng::new(self.seed, STREAM_EDIT);
        let mut order: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut order);
        let mut changed = Vec::with_capacity(edit + add);
        for &i in &order[..edit.min(n)] {
            let rel = Self::doc_path(i);
            let path = root.join(&rel);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let mut blocks: Vec<String> = text.trim_end().split("\n\n").map(String::from).collect();
            let paragraphs: Vec<usize> = (0..blocks.len())
                .filter(|&b| !blocks[b].starts_with('#'))
                .collect();
            let at = paragraphs[rng.below(paragraphs.len())];
            blocks[at] = self.paragraph(&mut rng);
            let mut doc = blocks.join("\n\n");
            doc.push('\n');
            std::fs::write(&path, doc)
                .with_context(|| format!("cannot write {}", path.display()))?;
            changed.push(rel);
        }
        for &i in order.iter().skip(edit).take(delete) {
            let path = root.join(Self::doc_path(i));
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot delete {}", path.display()))?;
        }
        for i in n..n + add {
            self.write_doc(root, i)?;
            changed.push(Self::doc_path(i));
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_deterministic_and_sized() {
        let a = Generator::new(7);
        let b = Generator::new(7);
        for i in 0..200 {
            let d = a.document(i);
            assert_eq!(d, b.document(i));
            assert!(
                (MIN_DOC..=MAX_DOC).contains(&d.len()),
                "doc {i}: {}",
                d.len()
            );
            assert!(d.starts_with("# "));
            assert!(d.contains("\n\n## "));
        }
        assert_ne!(a.document(0), Generator::new(8).document(0));
    }
}
