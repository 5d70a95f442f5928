//! Kernel notifications, as far as the reconcile loop cares, and the rule that decides which of them
//! mean the kernel must be read again.
//!
//! Most notifications a flannel host sees are not news: the echo of the loop's own changes, ARP and
//! bridge learning on devices that are not flannel's, routes outside the cluster networks. Reading
//! the whole kernel state for each of them made a host with thousands of peers spend its time in
//! route dumps. [`needs_read`] keeps the reads for what can really have broken the data plane: a
//! flannel entry gone or changed by someone else, a link or an address changed, or notifications lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use crate::{Fdb, KernelState, Neigh, Ownership, Route};

/// One entry of the kind the data plane is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A main-table route.
    Route(Route),
    /// A permanent neighbour.
    Neigh(Neigh),
    /// An FDB entry with a remote address.
    Fdb(Fdb),
}

/// What one kernel notification said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelChange {
    /// An entry appeared or was replaced.
    Added(Entry),
    /// An entry went away.
    Removed(Entry),
    /// Something on device `ifindex` that is not a whole entry of ours (a neighbour that is not
    /// permanent, for example, which may have replaced a permanent one).
    OnDevice(u32),
    /// A link or an address changed, or notifications were lost: anything may have changed.
    Other,
}

/// Whether `change` may have made the kernel differ from `known` (the entries as last read plus the
/// loop's own changes since) in a way that matters to `own`.
pub fn needs_read(change: &KernelChange, known: &KernelState, own: &Ownership) -> bool {
    match change {
        KernelChange::Other => true,
        KernelChange::OnDevice(i) => {
            own.route_oifs.contains(i)
                || own.neigh_ifindexes.contains(i)
                || own.fdb_ifindexes.contains(i)
        }
        KernelChange::Added(Entry::Route(r)) => {
            own.networks.iter().any(|n| n.contains(&r.dst)) && !known.routes.contains(r)
        }
        KernelChange::Removed(Entry::Route(r)) => known.routes.contains(r),
        KernelChange::Added(Entry::Neigh(n)) => {
            own.neigh_ifindexes.contains(&n.ifindex) && !known.neighs.contains(n)
        }
        KernelChange::Removed(Entry::Neigh(n)) => known.neigh_at(n.ifindex, n.ip).is_some(),
        KernelChange::Added(Entry::Fdb(e)) => {
            own.fdb_ifindexes.contains(&e.ifindex) && !known.fdb.contains(e)
        }
        KernelChange::Removed(Entry::Fdb(e)) => known.fdb_of(e.ifindex, e.mac).is_some(),
    }
}

/// The receiving end of kernel notifications: a bounded queue that never blocks the sender. When it
/// overflows, the changes in between are lost, and the receiver gets [`KernelChange::Other`] in
/// their place (so it reads the kernel again instead of missing a repair).
#[derive(Debug)]
pub struct Notifications {
    rx: mpsc::Receiver<KernelChange>,
    lost: Arc<AtomicBool>,
}

/// The sending end of [`Notifications`].
#[derive(Debug, Clone)]
pub struct NotificationSender {
    tx: mpsc::Sender<KernelChange>,
    lost: Arc<AtomicBool>,
}

/// A notification queue holding up to `capacity` changes.
pub fn notifications(capacity: usize) -> (NotificationSender, Notifications) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let lost = Arc::new(AtomicBool::new(false));
    (
        NotificationSender {
            tx,
            lost: lost.clone(),
        },
        Notifications { rx, lost },
    )
}

impl NotificationSender {
    /// Queues `change`; false once the receiver is gone.
    pub fn send(&self, change: KernelChange) -> bool {
        match self.tx.try_send(change) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lost.store(true, Ordering::SeqCst);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl Notifications {
    /// Waits for the next change; `None` when the sender is gone.
    pub async fn recv(&mut self) -> Option<KernelChange> {
        self.rx.recv().await
    }

    /// Everything queued now, with [`KernelChange::Other`] at the end if some changes were lost.
    pub fn drain(&mut self) -> Vec<KernelChange> {
        let mut out = Vec::new();
        while let Ok(c) = self.rx.try_recv() {
            out.push(c);
        }
        if self.lost.swap(false, Ordering::SeqCst) {
            out.push(KernelChange::Other);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MacAddr;

    fn own() -> Ownership {
        Ownership {
            networks: vec!["10.5.0.0/16".parse().unwrap()],
            route_oifs: vec![5],
            neigh_ifindexes: vec![5],
            fdb_ifindexes: vec![5],
            ..Ownership::default()
        }
    }

    fn route(dst: &str, oif: u32) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            gateway: Some("10.5.2.0".parse().unwrap()),
            oif,
            onlink: true,
        }
    }

    fn known() -> KernelState {
        let mut k = KernelState::default();
        k.routes.insert(route("10.5.2.0/24", 5));
        k.neighs.insert(Neigh {
            ifindex: 5,
            ip: "10.5.2.0".parse().unwrap(),
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
        });
        k.fdb.insert(Fdb {
            ifindex: 5,
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
            dst: "192.168.0.2".parse().unwrap(),
        });
        k
    }

    #[test]
    fn echoes_and_foreign_entries_are_not_news() {
        let (k, o) = (known(), own());
        for c in [
            // The loop's own changes coming back.
            KernelChange::Added(Entry::Route(route("10.5.2.0/24", 5))),
            KernelChange::Added(Entry::Neigh(k.neighs.first().unwrap().clone())),
            KernelChange::Added(Entry::Fdb(k.fdb.first().unwrap().clone())),
            // A route we deleted ourselves (no longer known).
            KernelChange::Removed(Entry::Route(route("10.5.9.0/24", 5))),
            // Routes outside the cluster network, learning on other devices.
            KernelChange::Added(Entry::Route(route("192.168.7.0/24", 2))),
            KernelChange::Added(Entry::Fdb(Fdb {
                ifindex: 9,
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                dst: "0.0.0.0".parse().unwrap(),
            })),
            KernelChange::OnDevice(2),
        ] {
            assert!(!needs_read(&c, &k, &o), "{c:?}");
        }
    }

    #[test]
    fn a_broken_or_foreign_change_to_ours_is_news() {
        let (k, o) = (known(), own());
        let mut other_mac = k.neighs.first().unwrap().clone();
        other_mac.mac = MacAddr([2, 0, 0, 0, 0, 7]);
        for c in [
            KernelChange::Other,
            KernelChange::OnDevice(5),
            KernelChange::Removed(Entry::Route(route("10.5.2.0/24", 5))),
            // Someone put another route into the cluster network.
            KernelChange::Added(Entry::Route(route("10.5.3.0/24", 2))),
            KernelChange::Removed(Entry::Neigh(other_mac.clone())),
            KernelChange::Added(Entry::Neigh(other_mac)),
            KernelChange::Removed(Entry::Fdb(k.fdb.first().unwrap().clone())),
        ] {
            assert!(needs_read(&c, &k, &o), "{c:?}");
        }
    }

    #[tokio::test]
    async fn an_overflow_is_reported_as_other() {
        let (tx, mut rx) = notifications(2);
        for _ in 0..5 {
            assert!(tx.send(KernelChange::OnDevice(1)));
        }
        assert_eq!(rx.recv().await, Some(KernelChange::OnDevice(1)));
        assert_eq!(
            rx.drain(),
            vec![KernelChange::OnDevice(1), KernelChange::Other],
            "three were lost"
        );
        assert!(rx.drain().is_empty(), "reported once");
        drop(rx);
        assert!(!tx.send(KernelChange::Other), "the receiver is gone");
    }
}
