//! The reconcile loop shared by the kernel backends.
//!
//! It keeps a [`LeaseTracker`] fed from the subnet manager's watch and, whenever something may have
//! changed, lets the backend's [`Model`] repair its devices and compute the desired state, then applies
//! the difference. Triggers: every lease event, every kernel notification (debounced), a failed pass
//! (retried with backoff), and a periodic resync as a safety net (it also catches changes the kernel
//! does not announce, e.g. routes dropped with a device set down).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{KernelOps, KernelState, Ownership, ReconcileReport, reconcile_once};
use flannel_core::{BackendError, Lease, LeaseTracker, SubnetKey, SubnetManager};

/// What a backend contributes to the loop.
#[async_trait]
pub trait Model: Send + std::fmt::Debug {
    /// Makes sure the backend's devices exist and are configured (recreating them if they were
    /// deleted or set down). Called before every pass.
    async fn prepare(&mut self) -> Result<(), BackendError>;

    /// The desired entries for `leases` (the peers' leases, own lease excluded), which existing entries
    /// are the backend's, and warnings about leases that cannot be served (logged once each).
    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>);
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Periodic resync interval.
    pub resync: Duration,
    /// How long to collect kernel notifications before reacting.
    pub debounce: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(10),
            debounce: Duration::from_millis(50),
        }
    }
}

fn log_report(report: &ReconcileReport, first: bool) {
    if report.applied.is_empty() {
        return;
    }
    let summary: Vec<String> = report
        .applied
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    if first {
        info!(changes = %summary.join(", "), "data plane synchronised");
    } else {
        info!(changes = %summary.join(", "), "data plane repaired or updated");
    }
}

/// Runs the loop until `shutdown`. `notifications` delivers a `()` per kernel change (see
/// [`crate::netlink::Netlink::subscribe`]); pass `None` to rely on lease events and resyncs only.
pub async fn run(
    model: &mut dyn Model,
    kernel: &dyn KernelOps,
    sm: Arc<dyn SubnetManager>,
    own: SubnetKey,
    mut notifications: Option<mpsc::Receiver<()>>,
    opts: DriverOptions,
    shutdown: CancellationToken,
) -> Result<(), BackendError> {
    let (tx, mut rx) = mpsc::channel(1024);
    let watch_stop = shutdown.child_token();
    let _guard = watch_stop.clone().drop_guard();
    let watcher = {
        let (sm, stop) = (sm.clone(), watch_stop.clone());
        tokio::spawn(async move { sm.watch_leases(tx, stop).await })
    };
    // The host's routing before this run changes anything: what the lease policy protects.
    let host_routes = kernel.host_routes().await.unwrap_or_else(|e| {
        warn!(error = %crate::chain(&e), "cannot read the routing table; only the cluster network is checked for leases");
        Vec::new()
    });
    let policy = crate::LeasePolicy::new(own, &model.desired(&[]).1, &host_routes);
    drop(host_routes);
    let mut tracker = LeaseTracker::new(Some(own));
    let mut warned: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(opts.resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = Duration::from_millis(200);
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut synced_once = false;
    let mut have_snapshot = false;
    let mut dirty = false;
    loop {
        if dirty && have_snapshot {
            let ok = match model.prepare().await {
                Err(e) => {
                    warn!(error = %crate::chain(&e), "preparing the backend's devices failed");
                    false
                }
                Ok(()) => {
                    let leases: Vec<&Lease> = tracker.leases().collect();
                    let (allowed, refused) = policy.filter(&leases);
                    let (desired, ownership, mut warnings) = model.desired(&allowed);
                    let m = crate::metrics::metrics();
                    let fresh_refusals: Vec<&String> =
                        refused.iter().filter(|r| !warned.contains(*r)).collect();
                    m.leases_refused.inc_by(fresh_refusals.len() as u64);
                    warnings.extend(refused);
                    // Each problem is logged once, when it appears (a change of the lease makes a
                    // new message).
                    let now: BTreeSet<String> = warnings.into_iter().collect();
                    for w in now.difference(&warned) {
                        error!("{w}");
                    }
                    warned = now;
                    m.reconcile_runs.inc();
                    match reconcile_once(kernel, &desired, &ownership).await {
                        Ok(report) => {
                            for (label, n) in &report.applied {
                                m.record_change(label, *n as u64);
                            }
                            m.netlink_errors.inc_by(report.failed.len() as u64);
                            log_report(&report, !synced_once);
                            synced_once = true;
                            for f in &report.failed {
                                warn!(error = %f, "data plane change failed; will retry");
                            }
                            debug!(entries = desired.len(), "reconciled");
                            report.failed.is_empty()
                        }
                        Err(e) => {
                            m.netlink_errors.inc();
                            warn!(error = %crate::chain(&e), "reading the kernel state failed");
                            false
                        }
                    }
                }
            };
            if ok {
                retry = Duration::from_millis(200);
                retry_at = None;
            } else {
                retry_at = Some(tokio::time::Instant::now() + retry);
                retry = (retry * 2).min(Duration::from_secs(10));
            }
        }
        let retry_sleep = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = rx.recv() => match r {
                Some(result) => {
                    if matches!(result, flannel_core::LeaseWatchResult::Snapshot(_)) {
                        have_snapshot = true;
                    }
                    let mut events = tracker.apply(result);
                    // Take everything that is already queued before reconciling once.
                    while let Ok(more) = rx.try_recv() {
                        events.extend(tracker.apply(more));
                    }
                    for e in &events {
                        match e {
                            flannel_core::LeaseEvent::Added(l) => debug!(lease = %l, "peer lease added or changed"),
                            flannel_core::LeaseEvent::Removed(l) => debug!(lease = %l, "peer lease removed"),
                        }
                    }
                    dirty = true;
                }
                None => {
                    return match watcher.await {
                        Ok(Err(e)) => Err(BackendError::Subnet(e)),
                        _ if shutdown.is_cancelled() => Ok(()),
                        _ => Err(BackendError::Other("the lease watch stopped unexpectedly".into())),
                    };
                }
            },
            Some(()) = async { match notifications.as_mut() { Some(n) => n.recv().await, None => std::future::pending().await } } => {
                // Collect the burst before reacting; a stop request ends the wait.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(opts.debounce) => {}
                }
                if let Some(n) = notifications.as_mut() {
                    while n.try_recv().is_ok() {}
                }
                dirty = true;
            }
            _ = tick.tick() => dirty = true,
            _ = retry_sleep => dirty = true,
        }
    }
    Ok(())
}

/// [`run`] on the real kernel: a netlink connection plus notifications (falling back to periodic
/// resyncs if the subscription fails).
pub async fn run_on_netlink(
    model: &mut dyn Model,
    sm: Arc<dyn SubnetManager>,
    own: SubnetKey,
    shutdown: CancellationToken,
) -> Result<(), BackendError> {
    let kernel = crate::netlink::Netlink::new()?;
    let notifications = match crate::netlink::Netlink::subscribe() {
        Ok(n) => Some(n),
        Err(e) => {
            warn!(error = %crate::chain(&e), "no netlink notifications; relying on periodic resync");
            None
        }
    };
    run(
        model,
        &kernel,
        sm,
        own,
        notifications,
        DriverOptions::default(),
        shutdown,
    )
    .await
}

/// A [`flannel_core::Network`] whose data plane is kept by this driver on the real kernel: what a kernel
/// backend returns from `register_network` once its devices exist and its lease is acquired.
#[derive(Debug)]
pub struct ReconciledNetwork<M: Model + Sync + 'static> {
    lease: flannel_core::Lease,
    mtu: u32,
    model: M,
    sm: Arc<dyn SubnetManager>,
}

impl<M: Model + Sync + 'static> ReconciledNetwork<M> {
    /// A network for `lease` with pod MTU `mtu`, kept by `model`.
    pub fn new(lease: flannel_core::Lease, mtu: u32, model: M, sm: Arc<dyn SubnetManager>) -> Self {
        Self {
            lease,
            mtu,
            model,
            sm,
        }
    }
}

#[async_trait]
impl<M: Model + Sync + 'static> flannel_core::Network for ReconciledNetwork<M> {
    fn lease(&self) -> &flannel_core::Lease {
        &self.lease
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn run(self: Box<Self>, shutdown: CancellationToken) -> Result<(), BackendError> {
        let ReconciledNetwork {
            lease,
            mut model,
            sm,
            ..
        } = *self;
        run_on_netlink(&mut model, sm, lease.key, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    //! The loop under paused time: waiting for the first snapshot, debounce, backoff after a failed
    //! pass, shutdown during the debounce, and a watch that ends.

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::{FakeKernel, Route};
    use flannel_core::{LeaseAttrs, LeaseWatchResult, NetworkConfig, SubnetError};
    use ipnet::IpNet;

    /// A subnet manager whose watch forwards what the test sends.
    #[derive(Debug)]
    struct ScriptedStore(Mutex<Option<mpsc::Receiver<LeaseWatchResult>>>);

    #[async_trait]
    impl SubnetManager for ScriptedStore {
        fn name(&self) -> &str {
            "scripted"
        }
        async fn get_network_config(&self) -> Result<NetworkConfig, SubnetError> {
            Err(SubnetError::Other("unused".into()))
        }
        async fn acquire_lease(&self, _: &LeaseAttrs) -> Result<Lease, SubnetError> {
            Err(SubnetError::Other("unused".into()))
        }
        async fn renew_lease(&self, _: &mut Lease) -> Result<(), SubnetError> {
            Ok(())
        }
        async fn watch_leases(
            &self,
            sink: mpsc::Sender<LeaseWatchResult>,
            shutdown: CancellationToken,
        ) -> Result<(), SubnetError> {
            let rx = self.0.lock().ok().and_then(|mut r| r.take());
            let Some(mut rx) = rx else { return Ok(()) };
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    r = rx.recv() => match r {
                        Some(r) => { let _ = sink.send(r).await; }
                        None => return Ok(()),
                    },
                }
            }
        }
        async fn watch_lease(
            &self,
            _: SubnetKey,
            _: mpsc::Sender<LeaseWatchResult>,
            shutdown: CancellationToken,
        ) -> Result<(), SubnetError> {
            shutdown.cancelled().await;
            Ok(())
        }
        async fn complete_lease(&self, _: Lease, _: CancellationToken) -> Result<(), SubnetError> {
            Ok(())
        }
    }

    /// A model that wants one route per peer on device #5 and counts (and can fail) its passes.
    #[derive(Debug, Default)]
    struct CountingModel {
        passes: Arc<AtomicUsize>,
        fail_first: usize,
    }

    #[async_trait]
    impl Model for CountingModel {
        async fn prepare(&mut self) -> Result<(), BackendError> {
            let n = self.passes.fetch_add(1, Ordering::SeqCst);
            if n < self.fail_first {
                return Err(BackendError::Other("device not ready".into()));
            }
            Ok(())
        }
        fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>) {
            let mut s = KernelState::default();
            for l in leases {
                s.routes.insert(Route {
                    dst: IpNet::V4(l.key.ipv4),
                    gateway: Some(std::net::IpAddr::V4(l.key.ipv4.network())),
                    oif: 5,
                    onlink: true,
                });
            }
            let own = Ownership {
                networks: vec!["10.5.0.0/16".parse().unwrap_or_else(|_| unreachable!())],
                route_oifs: vec![5],
                ..Ownership::default()
            };
            (s, own, Vec::new())
        }
    }

    fn lease(key: &str) -> Lease {
        Lease {
            key: key.parse().unwrap_or_else(|_| unreachable!()),
            enable_ipv4: true,
            attrs: LeaseAttrs::default(),
            expiration: None,
            asof: 0,
        }
    }

    struct Harness {
        leases: mpsc::Sender<LeaseWatchResult>,
        notify: mpsc::Sender<()>,
        passes: Arc<AtomicUsize>,
        kernel: Arc<FakeKernel>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), BackendError>>,
    }

    fn start(fail_first: usize) -> Harness {
        let (leases, rx) = mpsc::channel(16);
        let (notify, nrx) = mpsc::channel(64);
        let passes = Arc::new(AtomicUsize::new(0));
        let kernel = Arc::new(FakeKernel::default());
        let shutdown = CancellationToken::new();
        let sm: Arc<dyn SubnetManager> = Arc::new(ScriptedStore(Mutex::new(Some(rx))));
        let task = {
            let (passes, kernel, shutdown) = (passes.clone(), kernel.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut model = CountingModel { passes, fail_first };
                let opts = DriverOptions {
                    resync: Duration::from_secs(3600),
                    debounce: Duration::from_millis(50),
                };
                let own = "10.5.1.0-24".parse().unwrap_or_else(|_| unreachable!());
                run(
                    &mut model,
                    kernel.as_ref(),
                    sm,
                    own,
                    Some(nrx),
                    opts,
                    shutdown,
                )
                .await
            })
        };
        Harness {
            leases,
            notify,
            passes,
            kernel,
            shutdown,
            task,
        }
    }

    impl Harness {
        /// Sends `r` from the store and lets the loop take it (10 ms of paused time).
        async fn store_says(&self, r: LeaseWatchResult) {
            self.leases.send(r).await.unwrap_or_else(|_| unreachable!());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        /// Stops the loop; it must end cleanly.
        async fn stop(self) {
            self.shutdown.cancel();
            assert!(self.task.await.unwrap_or_else(|_| unreachable!()).is_ok());
        }
    }

    fn routes(k: &FakeKernel) -> usize {
        k.state.lock().map(|s| s.routes.len()).unwrap_or(0)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_happens_before_the_first_snapshot() {
        let h = start(0);
        // Events before any snapshot: the set of leases is not known yet, so no pass.
        h.leases
            .send(LeaseWatchResult::Events(vec![
                flannel_core::LeaseEvent::Added(lease("10.5.2.0-24")),
            ]))
            .await
            .unwrap_or_else(|_| unreachable!());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.passes.load(Ordering::SeqCst), 0);
        assert_eq!(routes(&h.kernel), 0);
        h.store_says(LeaseWatchResult::Snapshot(vec![lease("10.5.3.0-24")]))
            .await;
        assert_eq!(h.passes.load(Ordering::SeqCst), 1);
        assert_eq!(
            routes(&h.kernel),
            1,
            "the snapshot replaces what came before it"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_kernel_notifications_makes_one_pass() {
        let h = start(0);
        h.store_says(LeaseWatchResult::Snapshot(vec![])).await;
        let before = h.passes.load(Ordering::SeqCst);
        for _ in 0..20 {
            h.notify.send(()).await.unwrap_or_else(|_| unreachable!());
        }
        settle().await;
        assert_eq!(h.passes.load(Ordering::SeqCst), before, "still debouncing");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            h.passes.load(Ordering::SeqCst),
            before + 1,
            "one pass for the burst"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_pass_is_retried_with_growing_backoff() {
        let h = start(2);
        h.store_says(LeaseWatchResult::Snapshot(vec![lease("10.5.2.0-24")]))
            .await;
        assert_eq!(h.passes.load(Ordering::SeqCst), 1, "first pass failed");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            h.passes.load(Ordering::SeqCst),
            2,
            "retried after 200 ms, failed again"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            h.passes.load(Ordering::SeqCst),
            2,
            "the next wait is longer (400 ms)"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(h.passes.load(Ordering::SeqCst), 3);
        assert_eq!(routes(&h.kernel), 1, "the third pass went through");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_during_the_debounce_stops_at_once() {
        let h = start(0);
        h.store_says(LeaseWatchResult::Snapshot(vec![])).await;
        let passes = h.passes.load(Ordering::SeqCst);
        h.notify.send(()).await.unwrap_or_else(|_| unreachable!());
        settle().await;
        let counted = h.passes.clone();
        let t = tokio::time::Instant::now();
        h.stop().await;
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        assert_eq!(
            counted.load(Ordering::SeqCst),
            passes,
            "no pass after the stop"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_ends_is_an_error() {
        let h = start(0);
        drop(h.leases);
        let r = h.task.await.unwrap_or_else(|_| unreachable!());
        let e = r.expect_err("the loop cannot go on without a watch");
        assert!(e.to_string().contains("lease watch stopped"), "{e}");
        drop(h.notify);
    }
}
