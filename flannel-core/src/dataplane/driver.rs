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

use super::{KernelOps, KernelState, Ownership, ReconcileReport, reconcile_once};
use crate::{BackendError, Lease, LeaseTracker, SubnetKey, SubnetManager};

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
/// [`super::netlink::Netlink::subscribe`]); pass `None` to rely on lease events and resyncs only.
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
        warn!(error = %e, "cannot read the routing table; only the cluster network is checked for leases");
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
                    warn!(error = %e, "preparing the backend's devices failed");
                    false
                }
                Ok(()) => {
                    let leases: Vec<&Lease> = tracker.leases().collect();
                    let (allowed, refused) = policy.filter(&leases);
                    let (desired, ownership, mut warnings) = model.desired(&allowed);
                    let m = crate::metrics::metrics();
                    let fresh_refusals: Vec<&String> =
                        refused.iter().filter(|r| !warned.contains(*r)).collect();
                    m.leases_refused.fetch_add(
                        fresh_refusals.len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    warnings.extend(refused);
                    // Each problem is logged once, when it appears (a change of the lease makes a
                    // new message).
                    let now: BTreeSet<String> = warnings.into_iter().collect();
                    for w in now.difference(&warned) {
                        error!("{w}");
                    }
                    warned = now;
                    crate::metrics::inc(&m.reconcile_runs);
                    match reconcile_once(kernel, &desired, &ownership).await {
                        Ok(report) => {
                            for (label, n) in &report.applied {
                                m.record_change(label, *n as u64);
                            }
                            m.netlink_errors.fetch_add(
                                report.failed.len() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                            log_report(&report, !synced_once);
                            synced_once = true;
                            for f in &report.failed {
                                warn!(error = %f, "data plane change failed; will retry");
                            }
                            debug!(entries = desired.len(), "reconciled");
                            report.failed.is_empty()
                        }
                        Err(e) => {
                            crate::metrics::inc(&m.netlink_errors);
                            warn!(error = %e, "reading the kernel state failed");
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
                    if matches!(result, crate::LeaseWatchResult::Snapshot(_)) {
                        have_snapshot = true;
                    }
                    tracker.apply(result);
                    // Take everything that is already queued before reconciling once.
                    while let Ok(more) = rx.try_recv() {
                        tracker.apply(more);
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
                tokio::time::sleep(opts.debounce).await;
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
    let kernel = super::netlink::Netlink::new().map_err(|e| BackendError::Io {
        context: e.context,
        source: std::io::Error::other(e.message),
    })?;
    let notifications = match super::netlink::Netlink::subscribe() {
        Ok(n) => Some(n),
        Err(e) => {
            warn!(error = %e, "no netlink notifications; relying on periodic resync");
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

/// A [`crate::Network`] whose data plane is kept by this driver on the real kernel: what a kernel
/// backend returns from `register_network` once its devices exist and its lease is acquired.
#[derive(Debug)]
pub struct ReconciledNetwork<M: Model + Sync + 'static> {
    lease: crate::Lease,
    mtu: u32,
    model: M,
    sm: Arc<dyn SubnetManager>,
}

impl<M: Model + Sync + 'static> ReconciledNetwork<M> {
    /// A network for `lease` with pod MTU `mtu`, kept by `model`.
    pub fn new(lease: crate::Lease, mtu: u32, model: M, sm: Arc<dyn SubnetManager>) -> Self {
        Self {
            lease,
            mtu,
            model,
            sm,
        }
    }
}

#[async_trait]
impl<M: Model + Sync + 'static> crate::Network for ReconciledNetwork<M> {
    fn lease(&self) -> &crate::Lease {
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
