//! Spreading client connections over the worker threads. Each thread
//! accepts on its own `SO_REUSEPORT` socket, and the kernel picks the
//! socket by a hash of the client's address and port: with a few dozen
//! long keep-alive connections one thread often gets several more than
//! the other, and its clients wait longer (the latency tail). As HAProxy
//! does with its threads, a thread that accepts a connection while it
//! serves more than the least loaded thread hands the connection over to
//! that thread.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::runtime::Handle;

/// The worker threads' event loops and how many client connections each
/// serves.
#[derive(Clone, Debug, Default)]
pub struct Workers {
    handles: Arc<[Handle]>,
    load: Arc<[AtomicUsize]>,
}

/// A connection counted on its worker until dropped.
#[derive(Debug)]
pub struct OnWorker {
    load: Arc<[AtomicUsize]>,
    index: usize,
}

impl Drop for OnWorker {
    fn drop(&mut self) {
        if let Some(l) = self.load.get(self.index) {
            l.fetch_sub(1, Relaxed);
        }
    }
}

impl Workers {
    pub fn new(handles: Vec<Handle>) -> Self {
        let load = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Workers {
            handles: handles.into(),
            load,
        }
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    pub fn handle(&self, i: usize) -> Option<&Handle> {
        self.handles.get(i)
    }

    /// Which worker serves a connection accepted by worker `accepted`:
    /// itself, unless another serves at least two fewer connections. The
    /// connection is counted there until the returned guard drops.
    pub fn place(&self, accepted: usize) -> OnWorker {
        let mut index = accepted.min(self.load.len().saturating_sub(1));
        if let Some(own) = self.load.get(index).map(|l| l.load(Relaxed)) {
            let (least, least_load) = self
                .load
                .iter()
                .enumerate()
                .map(|(i, l)| (i, l.load(Relaxed)))
                .min_by_key(|&(_, l)| l)
                .unwrap_or((index, own));
            if least_load + 1 < own {
                index = least;
            }
        }
        if let Some(l) = self.load.get(index) {
            l.fetch_add(1, Relaxed);
        }
        OnWorker {
            load: self.load.clone(),
            index,
        }
    }
}

impl OnWorker {
    pub fn index(&self) -> usize {
        self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> (Vec<tokio::runtime::Runtime>, Workers) {
        let rts: Vec<_> = (0..n)
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime")
            })
            .collect();
        let w = Workers::new(rts.iter().map(|r| r.handle().clone()).collect());
        (rts, w)
    }

    #[test]
    fn connections_stay_where_accepted_until_a_thread_is_two_ahead() {
        let (_rts, w) = workers(2);
        let a = w.place(0);
        assert_eq!(a.index(), 0);
        // 1 vs 0: close enough, stays.
        let b = w.place(0);
        assert_eq!(b.index(), 0);
        // 2 vs 0: this one goes to worker 1.
        let c = w.place(0);
        assert_eq!(c.index(), 1);
        drop(c);
        drop(b);
        drop(a);
        // Uneven arrivals end up even.
        let all: Vec<_> = (0..64).map(|_| w.place(0)).collect();
        let on_one = all.iter().filter(|g| g.index() == 1).count();
        assert!((31..=33).contains(&on_one), "{on_one} of 64 on worker 1");
        drop(all);
        assert!(w.load.iter().all(|l| l.load(Relaxed) == 0));
    }
}
