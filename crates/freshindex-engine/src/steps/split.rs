//! Split: text to chunks of at most `chunk_size` characters with `chunk_overlap` shared
//! characters, Markdown-aware for Markdown files (headings, lists, code blocks), by sentences
//! and words otherwise. Built on the `text-splitter` crate.

use freshindex_core::SplitSpec;
use text_splitter::{ChunkConfig, MarkdownSplitter, TextSplitter};

/// Bump when splitting changes its output for the same text and spec.
pub const BEHAVIOR_VERSION: u64 = 1;

/// One chunk: its text and byte range in the text it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk<'a> {
    /// Start byte offset.
    pub start: usize,
    /// The chunk text (trimmed of surrounding whitespace).
    pub text: &'a str,
}

/// A configured splitter (build once per run; splitting is then allocation-light).
pub struct Splitter {
    markdown: MarkdownSplitter<text_splitter::Characters>,
    text: TextSplitter<text_splitter::Characters>,
}

impl std::fmt::Debug for Splitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splitter").finish_non_exhaustive()
    }
}

impl Splitter {
    /// A splitter for a validated spec.
    pub fn new(spec: &SplitSpec) -> Result<Splitter, String> {
        let config = || {
            ChunkConfig::new(spec.chunk_size)
                .with_overlap(spec.chunk_overlap)
                .map_err(|e| format!("split: {e}"))
        };
        Ok(Splitter {
            markdown: MarkdownSplitter::new(config()?),
            text: TextSplitter::new(config()?),
        })
    }

    /// Whether a key names a Markdown file.
    pub fn is_markdown(key: &str) -> bool {
        let lower = key.to_ascii_lowercase();
        lower.ends_with(".md") || lower.ends_with(".markdown")
    }

    /// Splits `text` (of the item `key`, whose extension picks Markdown or plain text).
    pub fn split<'a>(&self, key: &str, text: &'a str) -> Vec<Chunk<'a>> {
        let chunks: Vec<(usize, &str)> = if Self::is_markdown(key) {
            self.markdown.chunk_indices(text).collect()
        } else {
            self.text.chunk_indices(text).collect()
        };
        chunks
            .into_iter()
            .filter(|(_, t)| !t.trim().is_empty())
            .map(|(start, text)| Chunk { start, text })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_size_and_ranges() {
        let s = Splitter::new(&SplitSpec {
            chunk_size: 50,
            chunk_overlap: 10,
        })
        .expect("valid spec");
        let text = "# Title\n\nSome words here that go on. ".repeat(20);
        let chunks = s.split("a.md", &text);
        assert!(chunks.len() > 5);
        for c in &chunks {
            assert!(c.text.chars().count() <= 50);
            assert_eq!(&text[c.start..c.start + c.text.len()], c.text);
        }
        let long = "x".repeat(10_000);
        let chunks = s.split("a.txt", &long);
        assert!(chunks.iter().all(|c| c.text.chars().count() <= 50));
    }
}
