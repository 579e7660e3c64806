//! End to end: the command line. `pointsman check` and the help texts.

mod support;

use std::time::Duration;

use support::*;

const VALID: &str = r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:18080"
default_service = "web"

[services.web]
endpoints = [{ id = "web1", address = "127.0.0.1:9101" }]

[routes.blog]
path_prefix = "/blog"
service = "web"
"#;

#[test]
fn check_says_ok_for_a_valid_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("good.toml");
    std::fs::write(&path, VALID).expect("write");
    let (code, out, err) = run_cli(&["check", "--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("ok"), "check prints ok: {out}");
    assert!(out.contains("good.toml"), "and names the file: {out}");
}

/// The 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text.find(needle).expect("needle in text");
    text[..at].matches('\n').count() + 1
}

#[test]
fn check_names_file_and_line_of_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        // (file text, what is on the line the error is on, file name)
        (
            VALID.to_string() + "\n[routes.oops\n",
            "[routes.oops",
            "bad_syntax.toml",
        ),
        (
            VALID.replace("127.0.0.1:9101", "127.0.0.1"),
            "endpoints = ",
            "bad_address.toml",
        ),
        (
            VALID.to_string() + "\n[routes.nowhere]\npath_prefix = \"/n\"\n",
            "[routes.nowhere]",
            "bad_route.toml",
        ),
    ];
    for (text, on_line, name) in cases {
        let line = line_of(&text, on_line);
        let path = dir.path().join(name);
        std::fs::write(&path, &text).expect("write");
        let shown = path.display().to_string();
        let (code, out, err) = run_cli(&["check", "--config", &shown]);
        assert_eq!(code, 1, "{name}: stdout {out}\nstderr {err}");
        assert!(
            err.contains(&format!("{shown}:{line}")),
            "{name}: the error names {shown}:{line}:\n{err}"
        );
        assert!(!out.contains("ok"), "{name}: no ok on stdout: {out}");
    }
    let (code, _, err) = run_cli(&["check", "--config", "/nonexistent/pointsman.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/pointsman.toml"), "{err}");
}

#[test]
fn help_mentions_every_flag() {
    let (code, out, _) = run_cli(&["--help"]);
    assert_eq!(code, 0);
    for word in [
        "run",
        "check",
        "demo",
        "upstream",
        "--log-format",
        "--help",
        "--version",
    ] {
        assert!(
            out.contains(word),
            "`pointsman --help` mentions {word}:\n{out}"
        );
    }
    let (code, out, _) = run_cli(&["run", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--listen",
        "--admin",
        "--threads",
        "--takeover",
        "--log-format",
        "--help",
    ] {
        assert!(
            out.contains(flag),
            "`pointsman run --help` mentions {flag}:\n{out}"
        );
    }
    let (code, out, _) = run_cli(&["check", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--config"), "`pointsman check --help`:\n{out}");
    let (code, out, _) = run_cli(&["upstream", "--help"]);
    assert_eq!(code, 0);
    for flag in ["--listen", "--name"] {
        assert!(
            out.contains(flag),
            "`pointsman upstream --help` mentions {flag}:\n{out}"
        );
    }
}

#[test]
fn run_with_nothing_to_serve_says_what_to_pass() {
    let (code, _, err) = run_cli(&["run", "--admin", "127.0.0.1:0"]);
    assert_ne!(code, 0, "a proxy with no listener must not start: {err}");
    assert!(
        err.contains("nothing to serve") && err.contains("--listen") && err.contains("--config"),
        "the error names what to pass: {err}"
    );
}

/// A sidecar container mounts nothing: the environment alone configures
/// the listener, its default service, the admin listener and the registry.
#[tokio::test]
async fn run_from_the_environment_alone() {
    let upstream = Upstream::start("web1").await;
    let registry = tempfile::tempdir().expect("temp dir");
    let service_dir = registry.path().join("web");
    std::fs::create_dir_all(&service_dir).expect("service dir");
    std::fs::write(service_dir.join("web1"), upstream.addr.to_string()).expect("register");
    let (listen, admin) = (free_addr(), free_addr());
    let mut child = std::process::Command::new(BIN)
        .arg("run")
        .env_remove("POINTSMAN_CONFIG")
        .env("POINTSMAN_LISTEN", listen.to_string())
        .env("POINTSMAN_ADMIN", admin.to_string())
        .env("POINTSMAN_DEFAULT_SERVICE", "web")
        .env("POINTSMAN_REGISTRY_DIR", registry.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pointsman run");
    let client = client();
    let url = format!("http://{listen}/any/path");
    wait_for(
        Duration::from_secs(20),
        "the env-configured proxy serves web1",
        || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.text().await.is_ok_and(|t| t.contains("web1")),
                    _ => false,
                }
            }
        },
    )
    .await;
    let ready = client
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .expect("admin answers on POINTSMAN_ADMIN");
    assert_eq!(ready.status(), 200);
    sigterm(child.id());
    let status = wait_exit(&mut child, Duration::from_secs(20), "pointsman run").await;
    assert!(status.success(), "a clean stop: {status}");
}
