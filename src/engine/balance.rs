//! Step 4b of the flow: picking an endpoint of a service.
//!
//! Every balancer is built once per service when a table is built, and picks
//! per request without a lock: per-request state is a single atomic cursor.
//! Endpoints that do not accept traffic (drain, maint, down, weight 0) are
//! skipped at pick time, so a health flip needs no rebuild.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::engine::table::Endpoint;

/// How requests are spread over a service's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BalanceAlgorithm {
    /// Smooth weighted round robin.
    #[default]
    Roundrobin,
    /// Fewest in-flight requests relative to weight.
    Leastconn,
    /// Power of two random choices, weighted.
    Random,
    /// Consistent hash on the client IP.
    Source,
    /// Round robin with a sticky cookie: `sticky = "cookie"` on top of
    /// `roundrobin`, kept as HAProxy users write it.
    Cookie,
}

impl BalanceAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            BalanceAlgorithm::Roundrobin => "roundrobin",
            BalanceAlgorithm::Leastconn => "leastconn",
            BalanceAlgorithm::Random => "random",
            BalanceAlgorithm::Source => "source",
            BalanceAlgorithm::Cookie => "cookie",
        }
    }
}

/// Schedules longer than this are scaled down (weights keep their ratio).
const MAX_SCHEDULE: u64 = 1 << 16;
/// Ring points per unit of weight for `source`.
const POINTS_PER_WEIGHT: u32 = 64;
/// Weight units counted towards ring points; higher weights are capped.
const MAX_WEIGHT_POINTS: u32 = 64;

/// What a balancer may look at in a request.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickContext<'a> {
    pub client_ip: Option<IpAddr>,
    /// The value of this service's sticky cookie, if the request carries it.
    pub sticky: Option<&'a str>,
    /// An endpoint to avoid (a retry after it failed).
    pub avoid: Option<usize>,
}

/// A pick: the endpoint's index and whether a sticky cookie must be set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    pub set_cookie: bool,
}

/// A service's balancer: how it spreads requests, and, for a sticky
/// service, which endpoint each cookie value binds to.
#[derive(Debug)]
pub struct Balancer {
    spread: Spread,
    /// Cookie value -> endpoint index, for a sticky service.
    by_cookie: Option<HashMap<Arc<str>, usize>>,
}

/// How requests that no cookie binds are spread.
#[derive(Debug)]
pub enum Spread {
    RoundRobin(Schedule),
    LeastConn { cursor: AtomicUsize },
    Random { cumulative: Vec<u64> },
    Source { ring: Vec<(u64, u32)> },
}

impl Balancer {
    /// Builds the balancer for endpoints with their current effective
    /// weights. `cookie` spreads as roundrobin and is sticky (see
    /// [`Balancer::sticky`]).
    pub fn build(algorithm: BalanceAlgorithm, endpoints: &[Endpoint]) -> Balancer {
        // Backups have no share of their own: they are picked only when no
        // other endpoint takes traffic (see `pick`).
        let weights: Vec<u32> = endpoints
            .iter()
            .map(|e| if e.backup { 0 } else { e.balance_weight })
            .collect();
        let spread = match algorithm {
            BalanceAlgorithm::Roundrobin | BalanceAlgorithm::Cookie => {
                Spread::RoundRobin(Schedule::smooth(&weights))
            }
            BalanceAlgorithm::Leastconn => Spread::LeastConn {
                cursor: AtomicUsize::new(0),
            },
            BalanceAlgorithm::Random => {
                let mut total = 0u64;
                let cumulative = weights
                    .iter()
                    .map(|w| {
                        total += u64::from(*w);
                        total
                    })
                    .collect();
                Spread::Random { cumulative }
            }
            BalanceAlgorithm::Source => Spread::Source {
                ring: build_ring(endpoints, &weights),
            },
        };
        let balancer = Balancer {
            spread,
            by_cookie: None,
        };
        if algorithm == BalanceAlgorithm::Cookie {
            balancer.sticky(endpoints)
        } else {
            balancer
        }
    }

    /// The same balancer, made sticky: a request whose cookie value is
    /// an endpoint's goes to it while it serves sessions.
    pub fn sticky(self, endpoints: &[Endpoint]) -> Balancer {
        let by_cookie = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.cookie.clone(), i))
            .collect();
        Balancer {
            by_cookie: Some(by_cookie),
            ..self
        }
    }

    /// How requests that no cookie binds are spread.
    pub fn spread(&self) -> &Spread {
        &self.spread
    }

    /// Picks an endpoint that accepts traffic, or `None` if none does. A
    /// backup endpoint is picked only when no other one accepts traffic:
    /// the first backup in id order that does (HAProxy's default, without
    /// `allbackups`). A sticky balancer first honours the request's
    /// cookie, and asks for the cookie to be set whenever the endpoint
    /// picked is not the one the request was bound to.
    pub fn pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<Pick> {
        let Some(by_cookie) = &self.by_cookie else {
            return self.spread_pick(endpoints, ctx).map(|index| Pick {
                index,
                set_cookie: false,
            });
        };
        if let Some(&i) = ctx.sticky.and_then(|v| by_cookie.get(v)) {
            if Some(i) != ctx.avoid && endpoints[i].accepts_sticky() && endpoints[i].live.has_room()
            {
                return Some(Pick {
                    index: i,
                    set_cookie: false,
                });
            }
        }
        self.spread_pick(endpoints, ctx).map(|index| Pick {
            index,
            set_cookie: ctx.sticky != Some(&*endpoints[index].cookie),
        })
    }

    fn spread_pick(&self, endpoints: &[Endpoint], ctx: &PickContext<'_>) -> Option<usize> {
        let open = |i: usize| endpoints[i].accepts_new() && endpoints[i].live.has_room();
        let ok = |i: usize| Some(i) != ctx.avoid && !endpoints[i].backup && open(i);
        let index = match &self.spread {
            Spread::RoundRobin(s) => s.next(ok),
            Spread::LeastConn { cursor } => least_loaded(endpoints, cursor, ok),
            Spread::Random { cumulative } => two_choices(endpoints, cumulative, ok),
            Spread::Source { ring } => {
                let key = ctx.client_ip.map(hash_ip).unwrap_or(0);
                ring_lookup(ring, key, ok)
            }
        };
        // The fast path found nobody (e.g. all of a probe window is down):
        // a plain scan decides for sure.
        index
            .or_else(|| (0..endpoints.len()).find(|&i| ok(i)))
            .or_else(|| {
                (0..endpoints.len())
                    .find(|&i| Some(i) != ctx.avoid && endpoints[i].backup && open(i))
            })
            .or_else(|| {
                // Only the avoided endpoint is left: use it rather than fail.
                ctx.avoid.filter(|&i| i < endpoints.len() && open(i))
            })
    }
}

/// A precomputed smooth weighted round-robin order (nginx's algorithm), walked
/// by an atomic cursor.
#[derive(Debug)]
pub struct Schedule {
    order: Vec<u32>,
    cursor: AtomicUsize,
}

impl Schedule {
    pub fn smooth(weights: &[u32]) -> Schedule {
        let weights = scale(weights);
        let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += i64::from(*w);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            order.push(best as u32);
        }
        // Start each proxy replica at a different place so a fleet does not
        // send its first requests to the same endpoint.
        let start = if order.is_empty() {
            0
        } else {
            fastrand::usize(..order.len())
        };
        Schedule {
            order,
            cursor: AtomicUsize::new(start),
        }
    }

    /// The next endpoint in the order that `ok` accepts. Every slot tried
    /// is taken from the shared cursor, so the slots of an endpoint out of
    /// rotation go, in order, to whoever the next slots belong to: the rest
    /// share its traffic in proportion to their weights (taking the slot
    /// after it instead would give its whole share to one neighbour).
    fn next(&self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.order.len();
        if n == 0 {
            return None;
        }
        (0..n.min(64))
            .map(|_| self.order[self.cursor.fetch_add(1, Relaxed) % n] as usize)
            .find(|&i| ok(i))
    }
}

/// Divides weights by their gcd and caps the schedule length.
fn scale(weights: &[u32]) -> Vec<u32> {
    let g = weights
        .iter()
        .filter(|w| **w > 0)
        .fold(0u32, |g, w| gcd(g, *w))
        .max(1);
    let mut out: Vec<u32> = weights.iter().map(|w| w / g).collect();
    let total: u64 = out.iter().map(|w| u64::from(*w)).sum();
    if total > MAX_SCHEDULE {
        for w in &mut out {
            if *w > 0 {
                *w = ((u64::from(*w) * MAX_SCHEDULE / total) as u32).max(1);
            }
        }
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Fewest in-flight requests per unit of weight; ties go round robin.
fn least_loaded(
    endpoints: &[Endpoint],
    cursor: &AtomicUsize,
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = endpoints.len();
    if n == 0 {
        return None;
    }
    // Ties go to the first endpoint from `start`; starting only at one in
    // rotation keeps an endpoint out of it from doubling its neighbour's
    // share of the ties.
    let mut start = cursor.fetch_add(1, Relaxed);
    for _ in 1..n.min(64) {
        if ok(start % n) {
            break;
        }
        start = cursor.fetch_add(1, Relaxed);
    }
    let mut best: Option<(usize, u64, u64)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if !ok(i) {
            continue;
        }
        let live = &endpoints[i].live;
        let (load, weight) = (
            u64::from(live.in_flight()),
            u64::from(endpoints[i].balance_weight.max(1)),
        );
        // load/weight < best_load/best_weight, without division.
        if best.is_none_or(|(_, bl, bw)| load * bw < bl * weight) {
            best = Some((i, load, weight));
        }
    }
    best.map(|(i, _, _)| i)
}

/// Two weighted random candidates; the less loaded one wins.
fn two_choices(
    endpoints: &[Endpoint],
    cumulative: &[u64],
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let draw = || {
        let r = fastrand::u64(..total);
        cumulative.partition_point(|&c| c <= r)
    };
    let mut pick = None;
    for _ in 0..4 {
        let (a, b) = (draw(), draw());
        let load = |i: usize| {
            let live = &endpoints[i].live;
            (
                u64::from(live.in_flight()),
                u64::from(endpoints[i].balance_weight.max(1)),
            )
        };
        pick = match (ok(a), ok(b)) {
            (true, true) => {
                let ((la, wa), (lb, wb)) = (load(a), load(b));
                Some(if lb * wa < la * wb { b } else { a })
            }
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => None,
        };
        if pick.is_some() {
            break;
        }
    }
    pick
}

fn build_ring(endpoints: &[Endpoint], weights: &[u32]) -> Vec<(u64, u32)> {
    let mut ring = Vec::new();
    for (i, (e, w)) in endpoints.iter().zip(weights).enumerate() {
        let units = w.div_ceil(crate::engine::table::WEIGHT_SCALE);
        let points = units.min(MAX_WEIGHT_POINTS) * POINTS_PER_WEIGHT;
        for p in 0..points {
            // Points depend only on the endpoint's id, so when one endpoint
            // leaves, only the keys that were on its points move.
            ring.push((hash_bytes(e.id.as_bytes(), u64::from(p)), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

fn ring_lookup(ring: &[(u64, u32)], key: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
    if ring.is_empty() {
        return None;
    }
    let start = ring.partition_point(|(h, _)| *h < key);
    (0..ring.len())
        .map(|k| ring[(start + k) % ring.len()].1 as usize)
        .find(|&i| ok(i))
}

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets(), 0),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_bytes(&v4.octets(), 0),
            None => hash_bytes(&v6.octets(), 0),
        },
    }
}

/// FNV-1a with a splitmix64 finish: stable across processes and versions,
/// so every proxy replica maps a client to the same endpoint.
fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The cookie value that binds a client to an endpoint: its id when that is
/// a valid cookie value without `~` (which ends the endpoint's part of a
/// prefixed cookie, see `sticky`), a stable hash of it otherwise.
pub fn cookie_value(id: &str) -> String {
    let plain = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b';' | b'\\' | b'~'));
    if plain {
        id.to_string()
    } else {
        format!("h{:016x}", hash_bytes(id.as_bytes(), 0))
    }
}

/// Weighted choice among a split's arms.
pub fn pick_split<T>(arms: &[(T, u32)], total: u32) -> Option<&T> {
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u32(..total);
    for (t, w) in arms {
        if r < *w {
            return Some(t);
        }
        r -= w;
    }
    None
}

#[cfg(test)]
mod tests;
