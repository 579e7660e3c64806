//! The TCP engine (HAProxy's `mode tcp`): one endpoint per client
//! connection, chosen by the service's balancer, then bytes copied both ways
//! until each side has closed (a half-close is passed on, not treated as
//! the end).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::engine::balance::PickContext;
use crate::engine::table::SharedTable;

/// Connect attempts on distinct endpoints before a client is turned away.
const CONNECT_ATTEMPTS: usize = 3;

pub async fn serve_connection(
    table: SharedTable,
    listener: Arc<str>,
    mut client: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let _open = super::conn::CLIENT_CONNS.opened();
    let service = {
        let table = table.load();
        table
            .defaults
            .get(&listener)
            .and_then(|name| table.service(name))
            .cloned()
    };
    let Some(service) = service else {
        tracing::warn!(%listener, %peer, "tcp listener's service is not registered; closing the connection");
        return;
    };
    let mut avoid = None;
    for _ in 0..CONNECT_ATTEMPTS.min(service.endpoints.len().max(1)) {
        let ctx = PickContext {
            client_ip: Some(peer.ip()),
            sticky: None,
            avoid,
        };
        let Some(pick) = service.balancer.pick(&service.endpoints, &ctx) else {
            tracing::warn!(service = %service.name, %peer, "no endpoint accepts traffic; closing the connection");
            return;
        };
        let endpoint = &service.endpoints[pick.index];
        let target = (endpoint.address.host(), endpoint.address.port());
        let connected =
            tokio::time::timeout(service.settings.connect_timeout, TcpStream::connect(target))
                .await;
        let mut upstream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                endpoint.live.record_failure();
                tracing::warn!(endpoint = %endpoint.address, error = %e, "tcp connect failed; trying another endpoint");
                avoid = Some(pick.index);
                continue;
            }
            Err(_) => {
                endpoint.live.record_failure();
                tracing::warn!(endpoint = %endpoint.address, "tcp connect timed out; trying another endpoint");
                avoid = Some(pick.index);
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        let _in_flight = endpoint.live.start_request();
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok(_) => endpoint.live.record_status(200),
            Err(e) => {
                tracing::debug!(endpoint = %endpoint.address, error = %e, "tcp session ended with an error");
                endpoint.live.record_failure();
            }
        }
        drop(permit);
        return;
    }
}
