//! Reading an haproxy.cfg: lines into words (HAProxy's quoting and
//! escapes), words into sections. Nothing is interpreted here beyond which
//! section a line belongs to; [`super::translate`] gives the words meaning.

/// Why a line could not be split into words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("a quote ({0}) is not closed on this line")]
    UnclosedQuote(char),
}

/// The keywords that open a section, as HAProxy knows them.
const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "userlist",
    "peers",
    "resolvers",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "crt-store",
    "traces",
];

/// The sections pointsman reads; the others are noted as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionKind {
    Global,
    Defaults,
    Frontend,
    Backend,
    Listen,
    /// `userlist`, `resolvers`, `peers`, ...: nothing pointsman has.
    Other,
}

/// One line of the file with its words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: usize,
    /// The line as written, trimmed.
    pub text: String,
    /// The words, quotes removed and escapes applied; empty when the line
    /// could not be split (see `error`).
    pub words: Vec<String>,
    pub error: Option<LineError>,
}

impl Line {
    pub fn word(&self, i: usize) -> &str {
        self.words.get(i).map(String::as_str).unwrap_or("")
    }
}

/// A section header and the lines under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    pub kind: SectionKind,
    /// The section's name (`frontend http`); `None` for `global` and an
    /// unnamed `defaults`.
    pub name: Option<String>,
    pub header: Line,
    pub lines: Vec<Line>,
}

/// A whole file: the lines before the first section (HAProxy refuses
/// them) and the sections in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cfg {
    pub preamble: Vec<Line>,
    pub sections: Vec<Section>,
}

/// Splits the file into sections of lines. Never fails: a line that cannot
/// be split carries its error, for the translation to report.
pub fn parse(text: &str) -> Cfg {
    let mut cfg = Cfg::default();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        let (words, error) = match split_words(trimmed) {
            Ok(w) => (w, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        if words.is_empty() && error.is_none() {
            continue;
        }
        let line = Line {
            number: i + 1,
            text: trimmed.to_string(),
            words,
            error,
        };
        match section_kind(line.word(0)) {
            Some(kind) => cfg.sections.push(Section {
                kind,
                name: line.words.get(1).cloned(),
                header: line,
                lines: Vec::new(),
            }),
            None => match cfg.sections.last_mut() {
                Some(s) => s.lines.push(line),
                None => cfg.preamble.push(line),
            },
        }
    }
    cfg
}

fn section_kind(word: &str) -> Option<SectionKind> {
    Some(match word {
        "global" => SectionKind::Global,
        "defaults" => SectionKind::Defaults,
        "frontend" => SectionKind::Frontend,
        "backend" => SectionKind::Backend,
        "listen" => SectionKind::Listen,
        w if SECTIONS.contains(&w) => SectionKind::Other,
        _ => return None,
    })
}

/// Whether a text reads as an haproxy.cfg rather than TOML: a line that is
/// a section header (`frontend http`, `global`) and no `=` on it, which no
/// TOML file has.
pub fn looks_like_haproxy(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        let first = l.split_whitespace().next().unwrap_or("");
        !l.contains('=')
            && matches!(
                first,
                "global" | "defaults" | "frontend" | "backend" | "listen"
            )
    })
}

/// Splits a line into words as HAProxy does: blanks separate words, `#`
/// starts a comment, `"..."` and `'...'` group (escapes apply inside
/// double quotes only), and `\ `, `\#`, `\\`, `\r`, `\n`, `\t`, `\"`, `\'`
/// are escapes.
pub fn split_words(line: &str) -> Result<Vec<String>, LineError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some('\''), c) => word.push(c),
            (_, '\\') => {
                in_word = true;
                match chars.next() {
                    Some('r') => word.push('\r'),
                    Some('n') => word.push('\n'),
                    Some('t') => word.push('\t'),
                    Some(other) => word.push(other),
                    None => word.push('\\'),
                }
            }
            (None, '#') => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (_, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(LineError::UnclosedQuote(q));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_follow_haproxy_quoting() {
        let w = |s: &str| split_words(s).expect("splits");
        assert_eq!(
            w("bind *:80   ssl crt /a.pem"),
            ["bind", "*:80", "ssl", "crt", "/a.pem"]
        );
        assert_eq!(
            w("acl a path_beg /x # a comment"),
            ["acl", "a", "path_beg", "/x"]
        );
        assert_eq!(
            w(r"option httpchk GET /h HTTP/1.1\r\nHost:\ example.com"),
            [
                "option",
                "httpchk",
                "GET",
                "/h",
                "HTTP/1.1\r\nHost: example.com"
            ]
        );
        assert_eq!(
            w(r#"http-check send hdr "X Y" 'a\b'"#),
            ["http-check", "send", "hdr", "X Y", r"a\b"]
        );
        assert_eq!(w(r"acl a hdr(host) x\#y"), ["acl", "a", "hdr(host)", "x#y"]);
        assert_eq!(
            split_words("acl a \"open"),
            Err(LineError::UnclosedQuote('"'))
        );
    }

    #[test]
    fn lines_go_to_the_section_above_them_whatever_the_indentation() {
        let cfg = parse(
            "# top\nstray line\nglobal\n  maxconn 10\n\tbackend web_server\n\t\tserver a 1.2.3.4:80 check\nresolvers dns\n  nameserver x 1.1.1.1:53\n",
        );
        assert_eq!(cfg.preamble.len(), 1);
        assert_eq!(cfg.preamble[0].number, 2);
        let kinds: Vec<_> = cfg
            .sections
            .iter()
            .map(|s| (s.kind, s.name.clone(), s.lines.len()))
            .collect();
        assert_eq!(
            kinds,
            [
                (SectionKind::Global, None, 1),
                (SectionKind::Backend, Some("web_server".into()), 1),
                (SectionKind::Other, Some("dns".into()), 1),
            ]
        );
        assert_eq!(cfg.sections[1].lines[0].number, 6);
        assert_eq!(cfg.sections[1].lines[0].text, "server a 1.2.3.4:80 check");
    }

    #[test]
    fn an_haproxy_cfg_is_told_from_toml() {
        assert!(looks_like_haproxy(
            "global\n  daemon\nfrontend http\n  bind *:80\n"
        ));
        assert!(looks_like_haproxy("\tbackend web\n\t\tserver a b:1\n"));
        assert!(!looks_like_haproxy(
            "[global]\nadmin = \"127.0.0.1:8404\"\n"
        ));
        assert!(!looks_like_haproxy("global = 1\n"));
        assert!(!looks_like_haproxy(""));
    }
}
