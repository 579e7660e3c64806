use super::*;
use crate::engine::endpoint::EndpointState;
use crate::engine::table::Endpoint;
use pointsman_discovery::{Address, AdminState};

fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let live = Arc::new(EndpointState::default());
            Endpoint::new(
                format!("e{i}").into(),
                Address::new("127.0.0.1", 10_000 + i as u16),
                live,
                AdminState::Ready,
                *w,
            )
            .expect("valid endpoint")
        })
        .collect()
}

fn counts(b: &Balancer, eps: &[Endpoint], n: usize, ctx: PickContext<'_>) -> Vec<usize> {
    let mut c = vec![0; eps.len()];
    for _ in 0..n {
        c[b.pick(eps, &ctx).expect("a pick").index] += 1;
    }
    c
}

#[test]
fn smooth_round_robin_follows_weights_and_interleaves() {
    let eps = endpoints(&[5, 1, 1]);
    let b = Balancer::build(BalanceAlgorithm::Roundrobin, &eps);
    assert_eq!(
        counts(&b, &eps, 700, PickContext::default()),
        vec![500, 100, 100]
    );
    // Smooth: the heavy endpoint never gets more than 3 in a row in a cycle of 7.
    let Spread::RoundRobin(s) = b.spread() else {
        unreachable!()
    };
    let o = &s.order;
    assert_eq!(o.len(), 7);
    assert!(o.windows(4).all(|w| !w.iter().all(|i| *i == 0)), "{o:?}");
}

#[test]
fn weight_zero_and_drain_take_no_new_traffic() {
    let mut eps = endpoints(&[1, 0, 1]);
    eps[2].state = AdminState::Drain;
    let b = Balancer::build(BalanceAlgorithm::Roundrobin, &eps);
    assert_eq!(counts(&b, &eps, 30, PickContext::default()), vec![30, 0, 0]);
    eps[0].state = AdminState::Maint;
    assert!(b.pick(&eps, &PickContext::default()).is_none());
}

#[test]
fn avoid_prefers_another_endpoint_but_falls_back() {
    let eps = endpoints(&[1, 1]);
    let b = Balancer::build(BalanceAlgorithm::Roundrobin, &eps);
    for _ in 0..10 {
        let ctx = PickContext {
            avoid: Some(0),
            ..Default::default()
        };
        assert_eq!(b.pick(&eps, &ctx).map(|p| p.index), Some(1));
    }
    eps[1].live.set_healthy(false);
    let ctx = PickContext {
        avoid: Some(0),
        ..Default::default()
    };
    assert_eq!(b.pick(&eps, &ctx).map(|p| p.index), Some(0));
}

#[test]
fn leastconn_prefers_fewest_in_flight_per_weight() {
    let eps = endpoints(&[1, 1, 2]);
    let b = Balancer::build(BalanceAlgorithm::Leastconn, &eps);
    let _g0 = eps[0].live.start_request();
    let _g2 = eps[2].live.start_request();
    // e1 has 0 in flight.
    assert_eq!(
        b.pick(&eps, &PickContext::default()).map(|p| p.index),
        Some(1)
    );
    let _g1 = eps[1].live.start_request();
    // e0: 1/1, e1: 1/1, e2: 1/2 -> e2.
    assert_eq!(
        b.pick(&eps, &PickContext::default()).map(|p| p.index),
        Some(2)
    );
}

#[test]
fn random_follows_weights_roughly() {
    let eps = endpoints(&[1, 3]);
    let b = Balancer::build(BalanceAlgorithm::Random, &eps);
    let c = counts(&b, &eps, 4000, PickContext::default());
    // Two choices with no load differences: the first draw wins ties, so the
    // split is the weight ratio.
    assert!((800..1200).contains(&c[0]), "{c:?}");
}

#[test]
fn source_hash_is_stable_and_moves_only_the_leavers_keys() {
    let eps = endpoints(&[1, 1, 1, 1]);
    let b = Balancer::build(BalanceAlgorithm::Source, &eps);
    let ips: Vec<IpAddr> = (0..2000u32)
        .map(|i| IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]))
        .collect();
    let pick = |b: &Balancer, eps: &[Endpoint], ip: IpAddr| {
        let ctx = PickContext {
            client_ip: Some(ip),
            ..Default::default()
        };
        eps[b.pick(eps, &ctx).expect("pick").index].id.clone()
    };
    let before: Vec<_> = ips.iter().map(|ip| pick(&b, &eps, *ip)).collect();
    // Rebuilt without e3: keys of e0..e2 stay where they were.
    let rest: Vec<Endpoint> = eps[..3].to_vec();
    let b2 = Balancer::build(BalanceAlgorithm::Source, &rest);
    let mut moved = 0;
    for (ip, old) in ips.iter().zip(&before) {
        let new = pick(&b2, &rest, *ip);
        if &**old != "e3" {
            assert_eq!(&new, old, "a key of a staying endpoint moved");
        } else {
            moved += 1;
        }
    }
    assert!((300..700).contains(&moved), "e3 held {moved} of 2000 keys");
}

#[test]
fn cookie_sticks_while_accepted_and_rebinds_otherwise() {
    let mut eps = endpoints(&[1, 1, 1]);
    let b = Balancer::build(BalanceAlgorithm::Cookie, &eps);
    let fresh = b.pick(&eps, &PickContext::default()).expect("pick");
    assert!(fresh.set_cookie);
    let ctx = PickContext {
        sticky: Some("e1"),
        ..Default::default()
    };
    for _ in 0..5 {
        assert_eq!(
            b.pick(&eps, &ctx),
            Some(Pick {
                index: 1,
                set_cookie: false
            })
        );
    }
    // Draining still serves its sticky sessions, maintenance does not.
    eps[1].state = AdminState::Drain;
    assert_eq!(b.pick(&eps, &ctx).map(|p| p.index), Some(1));
    eps[1].state = AdminState::Maint;
    let p = b.pick(&eps, &ctx).expect("pick");
    assert_ne!(p.index, 1);
    assert!(p.set_cookie);
}

/// `sticky = "cookie"` on leastconn: a bound request goes to its
/// endpoint whatever the load; the others go to the least loaded one and
/// are told to bind to it.
#[test]
fn sticky_leastconn_keeps_bound_requests_and_spreads_the_rest_by_load() {
    let eps = endpoints(&[1, 1, 1]);
    let b = Balancer::build(BalanceAlgorithm::Leastconn, &eps).sticky(&eps);
    let _busy: Vec<_> = (0..5).map(|_| eps[1].live.start_request()).collect();
    let _one = eps[0].live.start_request();
    let bound = PickContext {
        sticky: Some("e1"),
        ..Default::default()
    };
    for _ in 0..5 {
        assert_eq!(
            b.pick(&eps, &bound),
            Some(Pick {
                index: 1,
                set_cookie: false
            }),
            "bound to the busiest, it stays"
        );
    }
    let fresh = b.pick(&eps, &PickContext::default()).expect("pick");
    assert_eq!((fresh.index, fresh.set_cookie), (2, true), "least loaded");
    let gone = PickContext {
        sticky: Some("e9"),
        ..Default::default()
    };
    let p = b.pick(&eps, &gone).expect("pick");
    assert_eq!(
        (p.index, p.set_cookie),
        (2, true),
        "an unknown value rebinds"
    );
    let plain = Balancer::build(BalanceAlgorithm::Leastconn, &eps);
    let p = plain.pick(&eps, &bound).expect("pick");
    assert_eq!((p.index, p.set_cookie), (2, false), "not sticky: no cookie");
}

#[test]
fn cookie_values_are_safe() {
    assert_eq!(cookie_value("web-1"), "web-1");
    let v = cookie_value("a;b");
    assert!(v.starts_with('h') && !v.contains(';'));
    let v = cookie_value("web~1");
    assert!(
        v.starts_with('h') && !v.contains('~'),
        "prefix mode splits at ~"
    );
    assert_eq!(v, cookie_value("web~1"), "stable");
}

#[test]
fn split_follows_weights() {
    let arms = [("a", 90), ("b", 10)];
    let mut b = 0;
    for _ in 0..10_000 {
        if *pick_split(&arms, 100).expect("arm") == "b" {
            b += 1;
        }
    }
    assert!((800..1200).contains(&b), "{b}");
}

#[test]
fn schedule_is_capped_for_large_services() {
    let weights = vec![256u32; 1000];
    let s = Schedule::smooth(&weights);
    assert_eq!(s.order.len(), 1000, "equal weights reduce by their gcd");
    let mut w: Vec<u32> = (1..=256).collect();
    w.extend(std::iter::repeat_n(255, 1000));
    let s = Schedule::smooth(&w);
    assert!(s.order.len() as u64 <= MAX_SCHEDULE + w.len() as u64);
}

/// Seed 002's deploy step: four servers, one taken out. Its share spreads
/// over the other three in proportion to their weights, for every
/// balancer (HAProxy 2.6: 134/133/133 of 400), never doubling one
/// neighbour's.
#[test]
fn a_server_out_of_rotation_spreads_its_share_over_the_rest() {
    for (algorithm, tolerance) in [
        (BalanceAlgorithm::Roundrobin, 1),
        (BalanceAlgorithm::Cookie, 1),
        (BalanceAlgorithm::Leastconn, 1),
        (BalanceAlgorithm::Random, 60),
    ] {
        for out in 0..4 {
            let mut eps = endpoints(&[1, 1, 1, 1]);
            eps[out].state = AdminState::Maint;
            let b = Balancer::build(algorithm, &eps);
            let c = counts(&b, &eps, 1200, PickContext::default());
            assert_eq!(c[out], 0, "{algorithm:?}: {c:?}");
            for (i, n) in c.iter().enumerate().filter(|(i, _)| *i != out) {
                assert!(
                    n.abs_diff(400) <= tolerance,
                    "{algorithm:?}, e{out} out: e{i} got {n} of 1200: {c:?}"
                );
            }
        }
    }
    // Weighted: 2:1:1 with a fourth taken out keeps 2:1:1.
    let mut eps = endpoints(&[2, 1, 1, 3]);
    eps[3].state = AdminState::Drain;
    let b = Balancer::build(BalanceAlgorithm::Roundrobin, &eps);
    assert_eq!(
        counts(&b, &eps, 800, PickContext::default()),
        vec![400, 200, 200, 0]
    );
    // Source: the keys of the one taken out move to the others, all of
    // them, not to one.
    let eps = endpoints(&[1, 1, 1, 1]);
    let b = Balancer::build(BalanceAlgorithm::Source, &eps);
    let mut moved = [0usize; 4];
    let mut out_eps = endpoints(&[1, 1, 1, 1]);
    out_eps[0].state = AdminState::Maint;
    for k in 0..4000u32 {
        let ip = IpAddr::from(k.to_be_bytes());
        let ctx = PickContext {
            client_ip: Some(ip),
            ..PickContext::default()
        };
        let before = b.pick(&eps, &ctx).expect("a pick").index;
        if before == 0 {
            moved[b.pick(&out_eps, &ctx).expect("a pick").index] += 1;
        }
    }
    let total: usize = moved.iter().sum();
    assert!(total > 600, "e0 had its share of keys: {moved:?}");
    for (i, n) in moved.iter().enumerate().skip(1) {
        assert!(
            *n * 6 > total,
            "e{i} took {n} of the {total} keys that moved: {moved:?}"
        );
    }
}

/// A backup takes requests only while no other endpoint does: the first
/// backup in order, for every balancer.
#[test]
fn backups_serve_only_when_every_other_endpoint_is_out() {
    for algorithm in [
        BalanceAlgorithm::Roundrobin,
        BalanceAlgorithm::Leastconn,
        BalanceAlgorithm::Random,
        BalanceAlgorithm::Source,
        BalanceAlgorithm::Cookie,
    ] {
        let mut eps = endpoints(&[1, 1, 1, 1]);
        eps[2].backup = true;
        eps[3].backup = true;
        let b = Balancer::build(algorithm, &eps);
        let ctx = PickContext {
            client_ip: Some(IpAddr::from([10, 0, 0, 1])),
            ..PickContext::default()
        };
        let c = counts(&b, &eps, 200, ctx);
        assert_eq!((c[2], c[3]), (0, 0), "{algorithm:?}: backups idle: {c:?}");
        eps[0].state = AdminState::Maint;
        let c = counts(&b, &eps, 200, ctx);
        assert_eq!(c[1], 200, "{algorithm:?}: one main left takes all: {c:?}");
        eps[1].live.set_healthy(false);
        let c = counts(&b, &eps, 200, ctx);
        assert_eq!(c[2], 200, "{algorithm:?}: the first backup: {c:?}");
        eps[2].state = AdminState::Drain;
        let c = counts(&b, &eps, 200, ctx);
        assert_eq!(c[3], 200, "{algorithm:?}: then the next: {c:?}");
        eps[1].live.set_healthy(true);
        let c = counts(&b, &eps, 200, ctx);
        assert_eq!(c[1], 200, "{algorithm:?}: a main back takes over: {c:?}");
    }
}
