//! Values quoted in errors are cut short: a registry value can be megabytes,
//! and every proxy would otherwise copy it whole into each log line, into
//! `/api/discovery`'s `last_error` and into the stats page.

/// The longest value an error quotes whole.
const QUOTED: usize = 64;
/// The longest error text kept whole.
const TEXT: usize = 256;

/// `s` quoted, or for a long one its length and its start:
/// `a value of 1048576 bytes starting "xxxx"...`.
pub fn quote(s: &str) -> String {
    if s.len() <= QUOTED {
        return format!("{s:?}");
    }
    format!(
        "a value of {} bytes starting {:?}...",
        s.len(),
        &s[..boundary(s, QUOTED)]
    )
}

/// An error text (one that may quote a value, like serde's) cut to a
/// readable length, saying how much was cut.
pub fn shorten(text: String) -> String {
    if text.len() <= TEXT {
        return text;
    }
    let end = boundary(&text, TEXT);
    format!("{}... ({} more bytes)", &text[..end], text.len() - end)
}

/// The largest char boundary of `s` at or below `at`.
fn boundary(s: &str, at: usize) -> usize {
    (0..=at.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole_long_ones_by_length_and_start() {
        assert_eq!(quote("127.0.0.1"), "\"127.0.0.1\"");
        let big = "x".repeat(1 << 20);
        let q = quote(&big);
        assert!(
            q.starts_with("a value of 1048576 bytes starting \"xxx"),
            "{q}"
        );
        assert!(q.len() < 120, "{q}");
        // Multi-byte text is cut on a character boundary.
        assert!(quote(&"é".repeat(100)).contains("200 bytes"));
        let long = shorten(format!("invalid type: string {big:?}"));
        assert!(long.len() < 300 && long.ends_with("more bytes)"), "{long}");
        assert_eq!(shorten("fine".into()), "fine");
    }
}
