//! Parse: bytes to text. UTF-8 text and Markdown; anything else is skipped with a reason.

/// Bump when parsing changes its output for the same bytes.
pub const BEHAVIOR_VERSION: u64 = 1;

/// Decoded text and where it starts in the file (after a byte-order mark).
#[derive(Debug, PartialEq)]
pub struct Parsed<'a> {
    /// The text.
    pub text: &'a str,
    /// Byte offset of `text` in the file.
    pub offset: usize,
}

/// Decodes a file's bytes, or says why it is skipped.
pub fn parse(bytes: &[u8]) -> Result<Parsed<'_>, String> {
    if bytes.is_empty() {
        return Err("empty file; skipped".into());
    }
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(format!("binary file (NUL byte at offset {at}); skipped"));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "not valid UTF-8 (invalid byte at offset {}); skipped",
            e.valid_up_to()
        )
    })?;
    let offset = if text.starts_with('\u{feff}') { 3 } else { 0 };
    let text = &text[offset..];
    if text.trim().is_empty() {
        return Err("empty file (whitespace only); skipped".into());
    }
    Ok(Parsed { text, offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_content() {
        assert!(parse(b"").expect_err("skipped").contains("empty"));
        assert!(parse(b"  \n").expect_err("skipped").contains("empty"));
        assert!(parse(b"ab\0c").expect_err("skipped").contains("binary"));
        assert!(
            parse(b"ab\xffc")
                .expect_err("skipped")
                .contains("not valid UTF-8")
        );
        assert_eq!(
            parse("\u{feff}hi".as_bytes()),
            Ok(Parsed {
                text: "hi",
                offset: 3
            })
        );
    }
}
