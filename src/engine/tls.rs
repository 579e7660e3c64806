//! TLS at the edge: the certificates of a directory, chosen by SNI, and
//! the client stream a TLS listener serves.
//!
//! The directory holds `NAME.crt` with `NAME.key`, or one `NAME.pem` with
//! both (certbot's `fullchain.pem` and `privkey.pem` concatenated, say).
//! A certificate serves the DNS names of its subject alternative names;
//! a handshake gets the certificate of its SNI name exactly, else of the
//! wildcard one label up (`*.example.com`), else the default: `default`
//! in the directory if there is one, else the first by name. The
//! directory is looked at every [`RELOAD_EVERY`]: a changed certificate
//! applies to new handshakes at once, open connections keep theirs. A
//! certificate that does not load (unreadable, no key, a key that is not
//! its own) is logged with its name and the one it replaces keeps
//! serving.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How often the certificate directory is looked at for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// One loaded certificate: its key, the names it serves, where it came
/// from and when that file last changed.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    modified: Option<SystemTime>,
}

/// The certificates in use, by file name (`NAME` of `NAME.crt`).
#[derive(Debug, Default)]
struct Certs {
    by_file: BTreeMap<String, Loaded>,
    /// DNS name (lower case; `*.x` for wildcards) to certificate.
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl Certs {
    fn index(by_file: BTreeMap<String, Loaded>) -> Certs {
        let mut by_name = HashMap::new();
        for loaded in by_file.values() {
            for name in &loaded.names {
                by_name
                    .entry(name.clone())
                    .or_insert_with(|| loaded.key.clone());
            }
        }
        let default = by_file
            .get("default")
            .or_else(|| by_file.values().next())
            .map(|l| l.key.clone());
        Certs {
            by_file,
            by_name,
            default,
        }
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let exact = |name: &str| self.by_name.get(name).cloned();
        sni.map(str::to_ascii_lowercase)
            .and_then(|name| {
                exact(&name).or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    exact(&format!("*.{parent}"))
                })
            })
            .or_else(|| self.default.clone())
    }
}

/// The certificates of a directory, for rustls to choose from per
/// handshake; [`CertStore::reload`] swaps in a new set.
#[derive(Debug)]
pub struct CertStore {
    dir: PathBuf,
    certs: ArcSwap<Certs>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.load().pick(hello.server_name())
    }
}

/// What a reload did, for the log: certificates loaded or changed, and
/// those refused with why.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub loaded: Vec<String>,
    pub refused: Vec<(String, String)>,
}

impl CertStore {
    /// Loads `dir`; fails when no certificate in it loads, saying why.
    pub fn open(dir: &Path) -> Result<Arc<CertStore>, String> {
        let store = Arc::new(CertStore {
            dir: dir.to_path_buf(),
            certs: ArcSwap::from_pointee(Certs::default()),
        });
        let done = store.reload();
        if store.certs.load().by_file.is_empty() {
            let why = match done.refused.first() {
                Some((name, why)) => format!("{name}: {why}"),
                None => "no NAME.crt + NAME.key or NAME.pem in it".into(),
            };
            return Err(format!(
                "tls_dir {}: no certificate could be loaded ({why})",
                dir.display()
            ));
        }
        Ok(store)
    }

    /// Looks at the directory again: new and changed certificates are
    /// loaded, removed ones dropped; one that does not load keeps the
    /// version in use.
    pub fn reload(&self) -> Reloaded {
        let current = self.certs.load();
        let mut done = Reloaded::default();
        let mut by_file = BTreeMap::new();
        // A directory that cannot be read (moved away for a moment while
        // a renewal swaps it) changes nothing.
        let files = match cert_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                let why = format!("the directory cannot be read: {e}");
                done.refused.push((self.dir.display().to_string(), why));
                return done;
            }
        };
        for (name, files) in files {
            let modified = files.modified();
            match current.by_file.get(&name) {
                Some(old) if old.modified == modified && modified.is_some() => {
                    by_file.insert(
                        name,
                        Loaded {
                            key: old.key.clone(),
                            names: old.names.clone(),
                            modified,
                        },
                    );
                    continue;
                }
                _ => {}
            }
            match files.load() {
                Ok((key, names)) => {
                    done.loaded.push(name.clone());
                    by_file.insert(
                        name,
                        Loaded {
                            key,
                            names,
                            modified,
                        },
                    );
                }
                Err(why) => {
                    done.refused.push((name.clone(), why));
                    if let Some(old) = current.by_file.get(&name) {
                        by_file.insert(
                            name,
                            Loaded {
                                key: old.key.clone(),
                                names: old.names.clone(),
                                modified: old.modified,
                            },
                        );
                    }
                }
            }
        }
        let changed = !done.loaded.is_empty() || by_file.len() != current.by_file.len();
        if changed {
            self.certs.store(Arc::new(Certs::index(by_file)));
        }
        done
    }

    /// Reloads every [`RELOAD_EVERY`] until `stop`, logging what changed.
    pub fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_refused = Vec::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let store = self.clone();
                let Ok(done) = tokio::task::spawn_blocking(move || store.reload()).await else {
                    continue;
                };
                for name in &done.loaded {
                    tracing::info!(dir = %self.dir.display(), certificate = %name, "certificate loaded");
                }
                // Said once per broken file, not every tick.
                if done.refused != last_refused {
                    for (name, why) in &done.refused {
                        tracing::error!(dir = %self.dir.display(), certificate = %name, error = %why, "certificate refused; the one in use keeps serving");
                    }
                    last_refused = done.refused;
                }
            }
        });
    }

    /// The names each certificate serves, by file name.
    pub fn names(&self) -> BTreeMap<String, Vec<String>> {
        self.certs
            .load()
            .by_file
            .iter()
            .map(|(f, l)| (f.clone(), l.names.clone()))
            .collect()
    }
}

/// A certificate's files: `NAME.pem`, or `NAME.crt` and `NAME.key`.
enum CertFiles {
    Pem(PathBuf),
    Pair(PathBuf, PathBuf),
}

impl CertFiles {
    fn modified(&self) -> Option<SystemTime> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        match self {
            CertFiles::Pem(p) => m(p),
            CertFiles::Pair(c, k) => m(c).max(m(k)),
        }
    }

    fn load(&self) -> Result<(Arc<CertifiedKey>, Vec<String>), String> {
        let (certs, key) = match self {
            CertFiles::Pem(p) => (read_certs(p)?, read_key(p)?),
            CertFiles::Pair(c, k) => (read_certs(c)?, read_key(k)?),
        };
        let names = {
            let leaf = webpki::EndEntityCert::try_from(&certs[0])
                .map_err(|e| format!("the certificate cannot be read: {e}"))?;
            leaf.valid_dns_names()
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
        };
        let provider = rustls::crypto::ring::default_provider();
        let key = CertifiedKey::from_der(certs, key, &provider)
            .map_err(|e| format!("the key does not go with the certificate: {e}"))?;
        Ok((Arc::new(key), names))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE block in it", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: no private key could be read: {e}", path.display()))
}

/// The certificates of `dir` by name: a `.pem`, or a `.crt` with its
/// `.key`.
fn cert_files(dir: &Path) -> io::Result<BTreeMap<String, CertFiles>> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir)?;
    for entry in entries.flatten() {
        let path = entry.path();
        let (Some(stem), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|e| e.to_str()),
        ) else {
            continue;
        };
        match ext {
            "pem" => {
                out.insert(stem.to_string(), CertFiles::Pem(path.clone()));
            }
            "crt" => {
                let key = path.with_extension("key");
                if key.exists() {
                    out.entry(stem.to_string())
                        .or_insert(CertFiles::Pair(path.clone(), key));
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The rustls server config of a TLS listener: TLS 1.2 and 1.3, HTTP/2
/// and HTTP/1.1 offered by ALPN, certificates from `store`.
pub fn server_config(store: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // The ring provider supports the default protocol versions.
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| unreachable!("ring supports TLS 1.2 and 1.3: {e}"));
    let mut config = builder.with_no_client_auth().with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A client connection's stream: plain TCP, or TLS over it.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The TCP socket under it (for readiness and SO_LINGER).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => s.get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Whether the TLS handshake chose HTTP/2 by ALPN.
    pub fn alpn_h2(&self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
