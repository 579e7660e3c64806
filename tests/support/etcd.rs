//! A real etcd (`pointsman_testkit::etcd`'s server), read and written with
//! `etcdctl`, and proxies following it (`pointsman run --etcd`).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::registry::{listener_config, CHANGE_DEADLINE};
use super::{free_addr, plain_client, wait_for, Proxy};

pub use pointsman_testkit::etcd::EtcdServer;

/// Runs `etcdctl <args>` against `etcd` and returns its stdout; panics if
/// it fails or takes more than 15 s.
pub async fn etcdctl(etcd: &EtcdServer, args: &[&str]) -> String {
    etcdctl_fed(etcd, args, None).await
}

/// [`etcdctl`] with `stdin` fed to it (a `txn` script), if any.
pub async fn etcdctl_fed(etcd: &EtcdServer, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = tokio::process::Command::from(etcd.etcdctl());
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run etcdctl {args:?} (install etcd-client): {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("etcdctl's stdin");
        pipe.write_all(input.as_bytes())
            .await
            .expect("write etcdctl's stdin");
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("etcdctl {args:?} did not finish within 15 s"))
        .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `key`; returns the revision of the write.
pub async fn put(etcd: &EtcdServer, key: &str, value: &str) -> i64 {
    let out: Value = serde_json::from_str(&etcdctl(etcd, &["-w", "json", "put", key, value]).await)
        .expect("etcdctl -w json put");
    out["header"]["revision"].as_i64().expect("a revision")
}

/// Deletes `key`; returns the revision of the delete.
pub async fn del(etcd: &EtcdServer, key: &str) -> i64 {
    let out: Value = serde_json::from_str(&etcdctl(etcd, &["-w", "json", "del", key]).await)
        .expect("etcdctl -w json del");
    out["header"]["revision"].as_i64().expect("a revision")
}

/// Starts `pointsman run --etcd <etcd> --proxy-id <id> --threads 1` with
/// one listener, `web` (see [`listener_config`]).
pub async fn start_proxy(etcd: &EtcdServer, id: &str, default_service: Option<&str>) -> Proxy {
    let endpoint = etcd.endpoint();
    Proxy::start_with_args(
        || listener_config(free_addr(), default_service),
        &["--etcd", &endpoint, "--proxy-id", id, "--threads", "1"],
    )
    .await
}

/// The etcd entry of a proxy's `/api/discovery`.
pub async fn etcd_source(proxy: &Proxy) -> Option<Value> {
    let all: Value = plain_client()
        .get(proxy.admin_url("/api/discovery"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    all.as_array()?
        .iter()
        .find(|s| s["source"] == "etcd")
        .cloned()
}

/// Waits until every proxy has applied etcd revision `rev` (or a later
/// one).
pub async fn wait_applied(proxies: &[&Proxy], rev: i64) {
    for p in proxies {
        wait_for(
            CHANGE_DEADLINE,
            &format!("proxy {} applied revision {rev}", p.admin),
            || async {
                etcd_source(p)
                    .await
                    .and_then(|s| s["applied_revision"].as_i64())
                    >= Some(rev)
            },
        )
        .await;
    }
}
