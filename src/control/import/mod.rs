//! Before step 0: `pointsman import haproxy.cfg`. An HAProxy config in,
//! the pointsman config that does the same out ([`parse`] reads the file's
//! sections, [`values`] and [`acl`] read what a line says, [`routes`] turns
//! first-match `use_backend` rules into most-specific routes, [`translate`]
//! writes the TOML). Whatever does not
//! translate stays in the output as a comment that says why. The result is
//! read back with [`Config::parse`], so the importer never hands out a
//! config pointsman would refuse.
//!
//! What translates is listed in CONFIG.md, "Coming from HAProxy".

pub mod acl;
pub mod parse;
pub mod routes;
pub mod translate;
pub mod values;

use std::path::Path;

use crate::control::config::Config;

pub use parse::looks_like_haproxy;
pub use translate::{Note, NoteKind};

/// Why an import did not produce a config.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: cannot read the HAProxy config: {reason}")]
    Read {
        path: String,
        reason: std::io::Error,
    },
    #[error(
        "{path}: no global, defaults, frontend, backend or listen section: expected an haproxy.cfg"
    )]
    NotHaproxy { path: String },
    #[error("the translation of {path} is not a valid pointsman config: {message}. This is a bug in `pointsman import`: please report it with the haproxy.cfg")]
    RoundTrip { path: String, message: String },
    #[error("{path}: cannot write the translated config: {reason}")]
    Write {
        path: String,
        reason: std::io::Error,
    },
}

/// A translated config: its text, the config it parses to, and the lines
/// left out.
pub struct Imported {
    pub toml: String,
    pub config: Config,
    pub notes: Vec<Note>,
    pub maps: usize,
}

impl Imported {
    /// Lines with nothing of them in the output.
    pub fn not_translated(&self) -> usize {
        self.notes
            .iter()
            .filter(|n| n.kind == NoteKind::NotTranslated)
            .count()
    }
}

/// Reads and translates an haproxy.cfg; map files are looked up beside it.
pub fn import_file(path: &Path) -> Result<Imported, ImportError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|reason| ImportError::Read {
        path: shown.clone(),
        reason,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| shown.clone());
    import_text(&name, &text, base)
}

/// Translates haproxy.cfg text; `name` names it in comments, `base` is where
/// relative map files are.
pub fn import_text(name: &str, text: &str, base: &Path) -> Result<Imported, ImportError> {
    let cfg = parse::parse(text);
    if !cfg
        .sections
        .iter()
        .any(|s| s.kind != parse::SectionKind::Other)
    {
        return Err(ImportError::NotHaproxy { path: name.into() });
    }
    let read_map = |file: &str| find_map(base, file);
    let t = translate::translate(name, &cfg, &read_map);
    let round_trip = |message: String| ImportError::RoundTrip {
        path: name.into(),
        message,
    };
    let config = Config::parse(&format!("<{name} translated>"), &t.toml)
        .map_err(|e| round_trip(e.to_string()))?;
    for (service, svc) in &config.services {
        if let Some(check) = &svc.check {
            check
                .validate()
                .map_err(|e| round_trip(format!("services.{service}: {e}")))?;
        }
    }
    let counts = (
        config.listeners.len(),
        config.services.len(),
        config.routes.len(),
        config.maps.len(),
    );
    if counts != (t.listeners, t.services, t.routes, t.maps) {
        return Err(round_trip(format!(
            "it has {counts:?} listeners, services, routes and maps, not the {:?} written",
            (t.listeners, t.services, t.routes, t.maps)
        )));
    }
    Ok(Imported {
        toml: t.toml,
        config,
        notes: t.notes,
        maps: t.maps,
    })
}

/// A map file by the path the haproxy.cfg gives: relative paths beside the
/// cfg; an absolute path as is, else its file name beside the cfg (a
/// config copied from the server it ran on).
fn find_map(base: &Path, file: &str) -> Option<translate::MapFile> {
    let given = Path::new(file);
    let candidates = if given.is_relative() {
        vec![base.join(given)]
    } else {
        let mut c = vec![given.to_path_buf()];
        c.extend(given.file_name().map(|n| base.join(n)));
        c
    };
    candidates.into_iter().find_map(|p| {
        let text = std::fs::read_to_string(&p).ok()?;
        Some(translate::MapFile {
            shown: p.display().to_string(),
            text,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_file_is_found_beside_the_cfg() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("hosts.map"), "a.example blue\n").expect("write");
        let cfg = "frontend web\n  mode http\n  bind 127.0.0.1:8080\n  use_backend %[req.hdr(host),lower,map(/etc/haproxy/hosts.map,blue)]\nbackend blue\n  server b1 127.0.0.1:9001\n";
        let imported = import_text("haproxy.cfg", cfg, dir.path()).expect("imports");
        let map = imported.config.maps.get("hosts").expect("map hosts");
        assert_eq!(map.get("a.example").map(String::as_str), Some("blue"));
        assert!(imported.toml.contains("read from"), "{}", imported.toml);
    }

    #[test]
    fn a_file_without_sections_is_refused() {
        let err = import_text(
            "x.cfg",
            "[global]\nadmin = \"127.0.0.1:1\"\n",
            Path::new("."),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("expected an haproxy.cfg"), "{err}");
    }

    #[test]
    fn a_missing_file_says_why_once() {
        let err = import_file(Path::new("/nonexistent/haproxy.cfg"))
            .err()
            .map(|e| format!("{:#}", anyhow::anyhow!(e)))
            .unwrap_or_default();
        assert_eq!(err.matches("No such file").count(), 1, "{err}");
    }
}
