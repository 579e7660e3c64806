//! A leased key against a real etcd: rewriting the value often must not put
//! off the keep-alive (a put under a lease does not renew it), so the key
//! stays present however busy its writer is.

use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use pointsman_discovery::{EtcdOptions, LeasedKey};
use tokio::time::Instant;

use pointsman_testkit::etcd::EtcdServer;

#[tokio::test]
async fn a_key_rewritten_faster_than_its_keep_alive_never_expires() {
    let etcd = EtcdServer::start();
    let mut opts = EtcdOptions::new([etcd.endpoint()]);
    opts.request_timeout = Duration::from_secs(2);
    let ttl = Duration::from_secs(2);
    let key = "/pointsman/proxies/busy";
    let leased = LeasedKey::start(opts, key, ttl).expect("options");

    // Watch the key from before the first write: every delete is seen,
    // not sampled.
    let mut client = Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect to the test etcd");
    let mut events = client
        .watch(key, Some(WatchOptions::new()))
        .await
        .expect("watch");

    // Rewritten every 100 ms for four TTLs: ten times as often as the
    // keep-alive is due.
    let end = Instant::now() + ttl * 4;
    let mut writes = 0u32;
    while Instant::now() < end {
        leased
            .put(format!("{{\"n\":{writes}}}"))
            .await
            .expect("the write");
        writes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut puts = 0u32;
    let mut deletes = 0u32;
    while let Ok(Some(resp)) = tokio::time::timeout(Duration::from_millis(500), events.message())
        .await
        .map(|m| m.expect("the watch"))
    {
        for ev in resp.events() {
            match ev.event_type() {
                EventType::Put => puts += 1,
                EventType::Delete => deletes += 1,
            }
        }
        if puts >= writes {
            break;
        }
    }
    assert_eq!(
        deletes, 0,
        "the key expired {deletes} times while it was rewritten every 100 ms ({puts} puts seen)"
    );
    assert_eq!(puts, writes, "every write seen by the watch");
    let resp = client.get(key, None).await.expect("get");
    assert_eq!(resp.kvs().len(), 1, "the key is still there");
}
