//! End to end: TLS listeners with the certificates of a directory, made
//! here by openssl and signed by a throwaway CA. SNI picks each
//! certificate (exact name, then wildcard, then the default); curl speaks
//! HTTP/1.1 and HTTP/2 (ALPN) through it and the upstream sees
//! `X-Forwarded-Proto: https`; a certificate replaced on disk serves new
//! handshakes while an open connection keeps working; a broken one is
//! refused and the one in use keeps serving.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// Runs `cmd` (through sh) in `dir`; panics with its output if it fails.
fn sh(dir: &Path, cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("sh -c {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA in `work`; `cert` signs leaf certificates with it.
struct Ca {
    work: tempfile::TempDir,
}

impl Ca {
    fn new() -> Ca {
        let work = tempfile::tempdir().expect("a temp dir");
        sh(
            work.path(),
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
             -keyout ca.key -out ca.crt -days 2 -subj '/CN=pointsman test CA' 2>/dev/null",
        );
        Ca { work }
    }

    fn ca_file(&self) -> PathBuf {
        self.work.path().join("ca.crt")
    }

    /// A certificate for `names` (the first is its CN) with serial
    /// `serial`, signed by the CA: (PEM certificate, PEM key).
    fn cert(&self, names: &[&str], serial: u32) -> (String, String) {
        let dir = self.work.path();
        let sans: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(
            dir.join("ext.cnf"),
            format!("subjectAltName={}\n", sans.join(",")),
        )
        .expect("write ext.cnf");
        sh(
            dir,
            &format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                 -keyout leaf.key -out leaf.csr -subj '/CN={}' 2>/dev/null && \
                 openssl x509 -req -in leaf.csr -CA ca.crt -CAkey ca.key -set_serial {serial} \
                 -days 2 -extfile ext.cnf -out leaf.crt 2>/dev/null",
                names[0]
            ),
        );
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("read the leaf");
        (read("leaf.crt"), read("leaf.key"))
    }
}

/// Writes `NAME.crt` and `NAME.key` into `dir` (through a rename, so the
/// proxy never reads half a file).
fn install(dir: &Path, name: &str, (cert, key): &(String, String)) {
    for (ext, text) in [("key", key), ("crt", cert)] {
        let tmp = dir.join(format!(".{name}.{ext}.new"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).expect("rename");
    }
}

/// The serial and subject of the certificate the proxy at `addr` shows
/// for SNI `name`, as openssl prints them.
fn served(addr: std::net::SocketAddr, name: &str) -> String {
    sh(
        Path::new("/"),
        &format!(
            "openssl s_client -connect {addr} -servername {name} </dev/null 2>/dev/null \
             | openssl x509 -noout -serial -subject"
        ),
    )
}

/// `curl` to `https://NAME:PORT/` resolved to the proxy, trusting the CA:
/// (HTTP version, body).
fn curl(ca: &Ca, addr: std::net::SocketAddr, name: &str, extra: &[&str]) -> (String, String) {
    let port = addr.port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca.ca_file())
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(extra)
        .args(["-w", "\n%{http_version}"])
        .arg(format!("https://{name}:{port}/"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (version.to_string(), body.to_string())
}

/// One GET on an open TLS connection: the answer, once the echo's body
/// has come.
async fn ask(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    tls.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"server\":\"app\"") {
        let n = tls.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn tls_config(listen: std::net::SocketAddr, dir: &Path, up: &Upstream) -> String {
    format!(
        r#"[global]
tls_dir = "{}"

[[listeners]]
name = "websecure"
bind = "{listen}"
tls = true
default_service = "web"

[services.web]
endpoints = [{}]
"#,
        dir.display(),
        endpoint_line(up, "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_each_certificate_and_both_http_versions_work() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().expect("a temp dir");
    install(certs.path(), "a", &ca.cert(&["a.test"], 11));
    install(certs.path(), "b", &ca.cert(&["b.test", "*.wild.test"], 12));
    install(certs.path(), "default", &ca.cert(&["default.test"], 13));
    let up = Upstream::start("app").await;
    let proxy = Proxy::start(|| tls_config(free_addr(), certs.path(), &up)).await;
    let addr = proxy.listener("websecure");

    for (sni, cn) in [
        ("a.test", "a.test"),
        ("b.test", "b.test"),
        ("x.wild.test", "b.test"),
        ("A.TEST", "a.test"),
        ("unknown.test", "default.test"),
    ] {
        let shown = served(addr, sni);
        assert!(shown.contains(&format!("CN = {cn}")), "SNI {sni}: {shown}");
    }

    let (version, body) = curl(&ca, addr, "a.test", &["--http1.1"]);
    assert_eq!(version, "1.1");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("the echo");
    assert_eq!(echo["server"], "app");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");
    let (version, body) = curl(&ca, addr, "x.wild.test", &["--http2"]);
    assert_eq!(version, "2", "HTTP/2 by ALPN");
    assert!(body.contains("\"server\":\"app\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_serves_new_handshakes_and_a_broken_one_is_refused() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().expect("a temp dir");
    install(certs.path(), "a", &ca.cert(&["a.test"], 21));
    let up = Upstream::start("app").await;
    let proxy = Proxy::start(|| tls_config(free_addr(), certs.path(), &up)).await;
    let addr = proxy.listener("websecure");
    assert!(
        served(addr, "a.test").contains("serial=15"),
        "serial 21 is 0x15"
    );

    // A keep-alive connection from before the rotation.
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca.ca_file()).expect("the CA") {
        roots.add(cert.expect("a CA cert")).expect("add the CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("a.test").expect("a name");
    let mut tls = connector.connect(name, tcp).await.expect("the handshake");
    assert!(ask(&mut tls).await.starts_with("HTTP/1.1 200"));

    install(certs.path(), "a", &ca.cert(&["a.test"], 22));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !served(addr, "a.test").contains("serial=16") {
        assert!(
            Instant::now() < deadline,
            "the new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ask(&mut tls).await.starts_with("HTTP/1.1 200"),
        "the open connection keeps working"
    );

    // A key that is not the certificate's: refused, named, and the one in
    // use keeps serving.
    let (cert, _) = ca.cert(&["a.test"], 23);
    let (_, other_key) = ca.cert(&["other.test"], 24);
    install(certs.path(), "a", &(cert, other_key));
    wait_for(
        Duration::from_secs(10),
        "the proxy refuses the broken certificate",
        || async { proxy.stderr().contains("certificate refused") },
    )
    .await;
    let log = proxy.stderr();
    assert!(log.contains("certificate=a"), "{log}");
    assert!(
        log.contains("the key does not go with the certificate"),
        "{log}"
    );
    assert!(
        served(addr, "a.test").contains("serial=16"),
        "the last good one serves"
    );
    let (_, body) = curl(&ca, addr, "a.test", &[]);
    assert!(body.contains("\"server\":\"app\""), "{body}");

    // The directory gone for a while (a renewal swapping it): nothing
    // changes.
    let away = certs.path().with_extension("away");
    std::fs::rename(certs.path(), &away).expect("move the directory away");
    wait_for(
        Duration::from_secs(10),
        "the proxy notices the directory gone",
        || async { proxy.stderr().contains("the directory cannot be read") },
    )
    .await;
    let still = served(addr, "a.test");
    std::fs::rename(&away, certs.path()).expect("move it back");
    assert!(still.contains("serial=16"), "still served: {still}");
}

/// A TLS listener needs certificates: without `tls_dir` the config is
/// refused saying what to set, and a directory with none in it is too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_without_certificates_is_refused() {
    let config = "[[listeners]]\nname = \"websecure\"\nbind = \"127.0.0.1:0\"\ntls = true\n";
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("p.toml");
    std::fs::write(&path, config).expect("write");
    let (code, _, err) = run_cli(&["check", "--config", path.to_str().unwrap_or_default()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("has tls = true but there are no certificates: set [global] tls_dir"),
        "{err}"
    );

    let empty = tempfile::tempdir().expect("a temp dir");
    let config = format!(
        "[global]\ntls_dir = \"{}\"\n{config}",
        empty.path().display()
    );
    std::fs::write(&path, config).expect("write");
    let (code, _, err) = run_cli(&["run", "--config", path.to_str().unwrap_or_default()]);
    assert_ne!(code, 0);
    assert!(err.contains("no certificate could be loaded"), "{err}");
}

/// A route with `https_redirect` sends plain requests to the same URL
/// over https with a 308, and its TLS answers carry HSTS; other routes
/// stay as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_redirect_and_hsts_are_per_route() {
    let ca = Ca::new();
    let certs = tempfile::tempdir().expect("a temp dir");
    install(certs.path(), "a", &ca.cert(&["a.test"], 31));
    let up = Upstream::start("app").await;
    let tls_port = free_addr();
    let config = |plain: std::net::SocketAddr| {
        format!(
            r#"[global]
tls_dir = "{}"

[[listeners]]
name = "web"
bind = "{plain}"
default_service = "web"

[[listeners]]
name = "websecure"
bind = "{tls_port}"
tls = true
default_service = "web"

[services.web]
endpoints = [{}]

[routes.secure]
host = "a.test"
path_prefix = "/"
service = "web"
https_redirect = true
https_port = {}
hsts_max_age = 600
"#,
            certs.path().display(),
            endpoint_line(&up, ""),
            tls_port.port()
        )
    };
    let proxy = Proxy::start(|| config(free_addr())).await;
    let plain = proxy.listener("web");
    let tls = proxy.listener("websecure");

    let head = |args: &[&str]| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "--max-time",
                "10",
                "--cacert",
            ])
            .arg(ca.ca_file())
            .args(args)
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    let redirected = head(&[
        "--resolve",
        &format!("a.test:{}:127.0.0.1", plain.port()),
        &format!("http://a.test:{}/cart?id=7", plain.port()),
    ]);
    assert!(redirected.starts_with("http/1.1 308"), "{redirected}");
    assert!(
        redirected.contains(&format!(
            "location: https://a.test:{}/cart?id=7",
            tls.port()
        )),
        "{redirected}"
    );
    let secure = head(&[
        "--resolve",
        &format!("a.test:{}:127.0.0.1", tls.port()),
        &format!("https://a.test:{}/cart", tls.port()),
    ]);
    assert!(
        secure.starts_with("http/1.1 200") || secure.starts_with("http/2 200"),
        "{secure}"
    );
    assert!(
        secure.contains("strict-transport-security: max-age=600"),
        "{secure}"
    );
    // Another host: no route of its own, no redirect, no HSTS.
    let other = head(&[&format!("http://127.0.0.1:{}/", plain.port())]);
    assert!(other.starts_with("http/1.1 200"), "{other}");
    assert!(!other.contains("strict-transport-security"), "{other}");
}
