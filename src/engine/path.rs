//! Phase 0b, before routing: the path a request is routed by is the path
//! it is forwarded with, and the path every backend would see.
//!
//! A route for `/public` must not reach `/admin` of a backend that cleans
//! up paths itself: `/public/../admin`, `/public/%2e%2e/admin`,
//! `/public%2F..%2Fadmin` and `/public/..;/admin` are all `/admin` to some
//! server. With `path_normalization = "strict"` (the default) the path is
//! normalised as RFC 3986 §6.2.2 describes and the result is both routed
//! and forwarded:
//!
//! - percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded, other escapes kept (their hex digits upper-cased);
//! - dot segments are removed (§5.2.4): `/a/./b/../c` is `/a/c`, and a
//!   path cannot climb above `/`;
//! - refused with 400, because servers disagree on what they mean: an
//!   encoded `/` (`%2F`), an encoded or raw `\`, an encoded NUL, a broken
//!   escape, and a dot segment carrying parameters (`..;x`, Tomcat's
//!   reading of `..`).
//!
//! Empty segments (`//`) are kept: RFC 3986 gives them meaning. The query
//! is never touched. `"off"` routes and forwards the raw path, for
//! applications that need encoded slashes; route prefixes are then
//! matched byte for byte and such an application must do its own checks.

use std::borrow::Cow;

use serde::Deserialize;

/// How request paths are read before routing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathNormalization {
    #[default]
    Strict,
    Off,
}

/// Why a path is refused in strict mode; each says what to send instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    EncodedSlash,
    Backslash,
    Nul,
    BadEscape,
    DotParameters,
}

impl PathError {
    /// What the 400 page says.
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::EncodedSlash => "the path holds an encoded slash (%2F): send `/` itself, or set path_normalization = \"off\" for an application that needs it",
            PathError::Backslash => "the path holds a backslash or an encoded one (%5C): send `/`",
            PathError::Nul => "the path holds an encoded NUL (%00)",
            PathError::BadEscape => "the path holds a `%` that is not followed by two hex digits: encode `%` as %25",
            PathError::DotParameters => "the path holds a dot segment with parameters (`..;` or `.;`)",
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The normalised form of an origin-form `path` (no query). Borrowed, with
/// no allocation, when the path is already normal, as nearly every path is.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        // `*` of `OPTIONS *`: nothing to normalise.
        return Ok(Cow::Borrowed(path));
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    // Escapes that stay as they are (`%20`) leave the path borrowed.
    let decoded = match path.contains('%') {
        true => Some(decode_unreserved(path)?).filter(|d| d != path),
        false => None,
    }
    .map_or(Cow::Borrowed(path), Cow::Owned);
    if !has_dot_segment(&decoded)? {
        return Ok(decoded);
    }
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes the escapes of unreserved characters; refuses those of `/`,
/// `\` and NUL, and broken ones.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // Everything else in a path hyper accepted is ASCII, but keep
            // any other byte sequence whole.
            let next = bytes[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let c = hi << 4 | lo;
        match c {
            b'/' => return Err(PathError::EncodedSlash),
            b'\\' => return Err(PathError::Backslash),
            0 => return Err(PathError::Nul),
            c if is_unreserved(c) => out.push(char::from(c)),
            c => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(c >> 4)]));
                out.push(char::from(HEX[usize::from(c & 15)]));
            }
        }
        i += 3;
    }
    Ok(out)
}

/// Whether a segment is `.` or `..`; refuses `.;x` and `..;x`.
fn is_dot(segment: &str) -> Result<bool, PathError> {
    let name = segment.split(';').next().unwrap_or(segment);
    let dot = name == "." || name == "..";
    if dot && name.len() != segment.len() {
        return Err(PathError::DotParameters);
    }
    Ok(dot)
}

fn has_dot_segment(path: &str) -> Result<bool, PathError> {
    let mut found = false;
    for segment in path.split('/') {
        found |= is_dot(segment)?;
    }
    Ok(found)
}

/// RFC 3986 §5.2.4 for an absolute path: `.` goes, `..` takes the segment
/// before it along (never climbing above the root); a dot segment at the
/// end leaves the path ending in `/`.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        if i == last {
            out.push("");
        }
    }
    let mut s = String::with_capacity(path.len());
    for segment in out {
        s.push('/');
        s.push_str(segment);
    }
    if s.is_empty() {
        s.push('/');
    }
    s
}

/// Does `path` start with a route's `prefix` at a segment boundary? `/api`
/// covers `/api` and `/api/x`, not `/apix`; a prefix ending in `/` covers
/// what is under it.
pub fn within_prefix(path: &str, prefix: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a//b/", "/a.b/c..d/.e", "/~user/x-y_z", "*"] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(b)) if b == p),
                "{p}"
            );
        }
    }

    #[test]
    fn dot_segments_are_removed_after_unreserved_escapes_are_decoded() {
        let cases = [
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/public/../admin", "/admin"),
            ("/a//../b", "/a/b"),
            ("/./", "/"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E./admin", "/admin"),
            ("/%41%62c", "/Abc"),
            ("/a%7eb", "/a~b"),
            ("/a%3fb", "/a%3Fb"),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
        // Escapes that stay escaped leave a normal path as it was.
        for p in ["/a%20b", "/%25", "/a%3Fb"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases = [
            ("/public%2F..%2Fadmin", PathError::EncodedSlash),
            ("/public/%2f", PathError::EncodedSlash),
            ("/a\\b", PathError::Backslash),
            ("/a%5cb", PathError::Backslash),
            ("/a%00", PathError::Nul),
            ("/a%zz", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("/public/..;/admin", PathError::DotParameters),
            ("/public/.;x/admin", PathError::DotParameters),
            ("/public/%2e%2e;/admin", PathError::DotParameters),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw), Err(want), "{raw}");
        }
        // Parameters on an ordinary segment are the application's.
        assert_eq!(
            norm("/a;jsessionid=1/b").as_deref(),
            Ok("/a;jsessionid=1/b")
        );
    }

    #[test]
    fn prefixes_end_at_a_segment() {
        assert!(within_prefix("/static", "/static"));
        assert!(within_prefix("/static/a.css", "/static"));
        assert!(!within_prefix("/staticadmin", "/static"));
        assert!(within_prefix("/static/", "/static/"));
        assert!(within_prefix("/anything", "/"));
        assert!(!within_prefix("/stat", "/static"));
    }
}
