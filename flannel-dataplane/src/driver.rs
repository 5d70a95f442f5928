//! The reconcile loop shared by the kernel backends.
//!
//! It keeps a [`LeaseTracker`] fed from the subnet manager's watch and, whenever something may have
//! changed, lets the backend's [`Model`] repair its devices and compute the desired state, then applies
//! the difference. Triggers: every lease event, kernel notifications that are news
//! ([`crate::changes::needs_read`]: not the echo of the loop's own changes, not entries that are not
//! flannel's; debounced), a failed pass (retried with backoff), and a periodic resync as a safety
//! net. Lease events are diffed against what the loop knows of the kernel; the kernel is read again
//! only at start, at a resync, after news from the kernel or after a failure.
//!
//! The kernel announces what breaks a data plane: a deleted or replaced entry, a device deleted or
//! set down (its routes go silently, but the link change is announced and makes the loop read
//! everything again), and so is a next-hop object deleted by hand (its IPv4 routes go silently). The
//! resync is for what is not announced or was lost: every 60 s (every 10 s when notifications are
//! unavailable), and less often on hosts with more than [`RESYNC_ENTRIES`] entries
//! ([`resync_interval`]), so that the safety net costs no more per minute than at that size.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::changes::{KernelChange, Notifications, needs_read};
use crate::{KernelOps, KernelState, LeasePolicy, Ownership, ReconcileReport, apply_diff};
use flannel_core::{
    BackendError, Backoff, Lease, LeaseChange, LeaseTracker, LeaseWatchResult, SubnetKey,
    SubnetManager,
};
use tokio::time::Instant;

/// What a backend contributes to the loop.
#[async_trait]
pub trait Model: Send + std::fmt::Debug {
    /// Makes sure the backend's devices exist and are configured (recreating them if they were
    /// deleted or set down). Called before every pass.
    async fn prepare(&mut self) -> Result<(), BackendError>;

    /// The desired entries for `leases` (the peers' leases, own lease excluded), which existing entries
    /// are the backend's, and warnings about leases that cannot be served (logged once each).
    fn desired(&self, leases: &[&Lease]) -> (KernelState, Ownership, Vec<String>);

    /// Called after a pass applied its kernel entries, for state a backend keeps outside the kernel's
    /// tables (the wireguard backend's peers, computed in [`Model::desired`]). An error fails the
    /// pass, which is then retried with backoff.
    async fn finish(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    /// How often the loop runs a pass without a lease event or a kernel notification (the
    /// safety-net resync); [`DriverOptions`]'s default when `None`. A backend that keeps state the
    /// kernel sends no notifications about (the ipsec backend's xfrm policies) asks for a shorter
    /// one.
    fn resync_every(&self) -> Option<Duration> {
        None
    }
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Periodic resync interval (a full read of the kernel) for up to [`RESYNC_ENTRIES`] entries;
    /// longer above (see [`resync_interval`]).
    pub resync: Duration,
    /// How long to collect kernel notifications before reacting.
    pub debounce: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(60),
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

/// What wakes the loop.
#[derive(Debug)]
enum Input {
    /// Results of the lease watch (everything queued, in order).
    Leases(Vec<LeaseWatchResult>),
    /// Kernel notifications (a burst).
    Kernel(Vec<KernelChange>),
    /// The periodic resync.
    Tick,
    /// The wait after a failed pass is over.
    RetryDue,
    /// A large change is over (no pass changed anything for [`QUIET`]): time to compact.
    Quiet,
    /// The lease watch ended.
    WatchEnded,
    /// Shutdown was requested.
    Shutdown,
}

/// Whether the loop goes on after an input.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// The wait before retrying a failed pass: 200 ms, doubling up to 10 s, back to 200 ms after a pass
/// that worked.
fn pass_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
}

/// Sets of this many kernel entries or more (the desired state, what the loop knows once that many
/// changes are recorded in it) are compacted (see [`flannel_core::compact`]).
const COMPACT_AFTER: usize = 1024;

/// The number of kernel entries (routes, neighbours, FDB entries) the safety-net resync reads per
/// [`DriverOptions::resync`] (3,333 vxlan peers, 10,000 host-gw peers). A full read and pass cost
/// 3 (vxlan) to 5 (host-gw) ms of CPU per 1000 entries on the lab machine, so the net costs at
/// most 0.03-0.05 CPU seconds a minute whatever the size.
pub const RESYNC_ENTRIES: usize = 10_000;

/// The longest wait between two safety-net resyncs.
pub const RESYNC_MAX: Duration = Duration::from_secs(600);

/// The wait until the next safety-net resync after a full read found `entries` entries: `base` for
/// up to [`RESYNC_ENTRIES`], and `base` for each [`RESYNC_ENTRIES`] begun above that (at most
/// [`RESYNC_MAX`], never less than `base`). A full read costs in proportion to the entries; this
/// keeps its cost per idle minute flat, while repairs of what the kernel announces (nearly
/// everything) still come within a second.
pub fn resync_interval(base: Duration, entries: usize) -> Duration {
    let times = entries.div_ceil(RESYNC_ENTRIES).max(1);
    base.saturating_mul(u32::try_from(times).unwrap_or(u32::MAX))
        .min(RESYNC_MAX.max(base))
}

/// How long after the last pass of a large change the loop compacts what it keeps (so a burst of
/// joining peers, which comes as many passes, is compacted once, at its end).
const QUIET: Duration = Duration::from_secs(1);

/// The loop's state between inputs: the leases, what it knows of the kernel, and what it owes.
#[derive(Debug)]
struct Loop {
    tracker: LeaseTracker,
    /// Whether the watch has delivered its first snapshot (before it, the set of leases is unknown).
    have_snapshot: bool,
    /// Whether a pass is due.
    dirty: bool,
    /// The kernel's entries as last read plus the loop's own changes since, and the ownership they
    /// were read for; `None` when the next pass must read the kernel.
    known: Option<(Ownership, KernelState)>,
    backoff: Backoff,
    /// When to retry after a failed pass.
    retry_at: Option<Instant>,
    synced_once: bool,
    /// Problems already logged (each is logged once, when it appears).
    warned: BTreeSet<String>,
    /// Kernel entries changed since the loop last compacted what it keeps.
    changed_since_release: usize,
    /// When to compact, once a large change is over.
    compact_at: Option<Instant>,
    /// The resync interval for a host with up to [`RESYNC_ENTRIES`] entries.
    resync: Duration,
    /// When the next safety-net resync is due.
    resync_at: Instant,
    /// Entries recorded in what the loop knows since it was last compacted.
    known_changes: usize,
    /// When the last pass that read the kernel did.
    last_read: Instant,
}

impl Loop {
    fn new(own: SubnetKey, resync: Duration) -> Self {
        Self {
            tracker: LeaseTracker::new(Some(own)),
            have_snapshot: false,
            dirty: false,
            known: None,
            backoff: pass_backoff(),
            retry_at: None,
            synced_once: false,
            warned: BTreeSet::new(),
            changed_since_release: 0,
            compact_at: None,
            resync,
            resync_at: Instant::now() + resync,
            known_changes: 0,
            last_read: Instant::now(),
        }
    }

    /// Whether `changes` may have broken what the loop knows of the kernel.
    fn is_news(&self, changes: &[KernelChange]) -> bool {
        match &self.known {
            None => true,
            Some((own, known)) => changes.iter().any(|c| needs_read(c, known, own)),
        }
    }

    /// Takes one input.
    fn on(&mut self, input: Input) -> Flow {
        match input {
            Input::Leases(results) => {
                let mut changed = 0;
                for r in results {
                    if matches!(r, LeaseWatchResult::Snapshot(_)) {
                        self.have_snapshot = true;
                    }
                    self.tracker.apply_each(r, |c| {
                        changed += 1;
                        match c {
                            LeaseChange::Added(l) => {
                                debug!(lease = %l, "peer lease added or changed")
                            }
                            LeaseChange::Removed(l) => debug!(lease = %l, "peer lease removed"),
                        }
                    });
                }
                // The lease table grows a lease at a time too, and a backend may keep state of
                // its own per lease (wireguard's peers) with no kernel entry changing.
                self.count_changes(changed, Instant::now());
                self.dirty = true;
            }
            Input::Kernel(changes) => {
                if self.is_news(&changes) {
                    self.known = None;
                    self.dirty = true;
                }
            }
            Input::Tick => {
                // Pushed back until the read; a pass that fails retries on its own schedule.
                self.resync_at = Instant::now() + self.resync;
                self.known = None;
                self.dirty = true;
            }
            Input::RetryDue => {
                self.retry_at = None;
                self.dirty = true;
            }
            Input::Quiet => self.compact(),
            Input::WatchEnded | Input::Shutdown => return Flow::Stop,
        }
        Flow::Continue
    }

    /// Compacts what the loop keeps and hands freed memory back. The loop's record of the kernel
    /// and its lease table grew one entry at a time (trees of half-full nodes); rebuilt in bulk
    /// they take about half the memory.
    fn compact(&mut self) {
        self.compact_at = None;
        self.changed_since_release = 0;
        if let Some((_, known)) = self.known.as_mut() {
            known.compact();
        }
        self.tracker.compact();
        crate::memory::release_freed();
    }

    /// Counts `changed` kernel entries or leases; once they add up to a large change, the loop
    /// compacts [`QUIET`] after the last pass or lease change that changed anything.
    fn count_changes(&mut self, changed: usize, now: Instant) {
        self.changed_since_release += changed;
        if changed > 0 && self.changed_since_release >= crate::memory::LARGE_CHANGE {
            self.compact_at = Some(now + QUIET);
        }
    }

    /// Whether a pass is due now.
    fn pass_due(&self) -> bool {
        self.dirty && self.have_snapshot
    }

    /// One pass: repair the devices, compute the desired state of the allowed leases, read the kernel
    /// if what the loop knows may be stale, apply the difference. A failure schedules a retry.
    async fn pass(&mut self, model: &mut dyn Model, kernel: &dyn KernelOps, policy: &LeasePolicy) {
        self.dirty = false;
        let ok = match model.prepare().await {
            Err(e) => {
                warn!(error = %crate::chain(&e), "preparing the backend's devices failed");
                false
            }
            Ok(()) => {
                self.reconcile(model, kernel, policy).await
                    && match model.finish().await {
                        Ok(()) => true,
                        Err(e) => {
                            warn!(error = %crate::chain(&e), "finishing the pass failed");
                            false
                        }
                    }
            }
        };
        if ok {
            self.backoff.reset();
            self.retry_at = None;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            crate::metrics::metrics().last_success.set(now);
        } else {
            // What the loop knows may be wrong after a failure: read the kernel next time.
            self.known = None;
            self.retry_at = Some(Instant::now() + self.backoff.next_delay());
        }
    }

    async fn reconcile(
        &mut self,
        model: &mut dyn Model,
        kernel: &dyn KernelOps,
        policy: &LeasePolicy,
    ) -> bool {
        let leases: Vec<&Lease> = self.tracker.leases().collect();
        let (allowed, refused) = policy.filter(&leases);
        let (mut desired, ownership, mut warnings) = model.desired(&allowed);
        drop(leases);
        // Backends build it an entry at a time (half-full trees); compact, it takes about half
        // the memory for the rest of the pass, where the pass's peak is.
        if desired.len() >= COMPACT_AFTER {
            desired.compact();
        }
        let m = crate::metrics::metrics();
        let fresh_refusals = refused.iter().filter(|r| !self.warned.contains(*r)).count();
        m.leases_refused.inc_by(fresh_refusals as u64);
        warnings.extend(refused);
        // Each problem is logged once, when it appears (a change of the lease makes a new message).
        let now: BTreeSet<String> = warnings.into_iter().collect();
        for w in now.difference(&self.warned) {
            error!("{w}");
        }
        self.warned = now;
        m.reconcile_runs.inc();
        // Devices recreated since the last read (new indexes): what the loop knows is stale.
        if self.known.as_ref().is_some_and(|(o, _)| *o != ownership) {
            self.known = None;
        }
        let read = self.known.is_none();
        let mut known = match self.known.take() {
            Some((_, k)) => k,
            None => match kernel.read(&ownership).await {
                Ok(mut k) => {
                    m.kernel_reads.inc();
                    k.compact();
                    self.known_changes = 0;
                    k
                }
                Err(e) => {
                    m.netlink_errors.inc();
                    warn!(error = %crate::chain(&e), "reading the kernel state failed");
                    return false;
                }
            },
        };
        let report = apply_diff(kernel, &desired, &ownership, &mut known).await;
        // What the loop knows grew by the recorded changes, an entry at a time.
        self.known_changes += report.applied.values().sum::<usize>();
        if self.known_changes >= COMPACT_AFTER.max(known.len() / 4) {
            known.compact();
            self.known_changes = 0;
        }
        if read {
            self.last_read = Instant::now();
        }
        // The next safety net is due the interval for the host's size now after the last full
        // read (a host that grew without a read gets the longer interval at once).
        self.resync_at = self.last_read + resync_interval(self.resync, known.len());
        let entries = desired.len();
        drop(desired);
        self.count_changes(report.applied.values().sum::<usize>(), Instant::now());
        for (label, n) in &report.applied {
            m.record_change(label, *n as u64);
        }
        m.netlink_errors.inc_by(report.failed.len() as u64);
        log_report(&report, !self.synced_once);
        self.synced_once = true;
        for f in &report.failed {
            warn!(error = %f, "data plane change failed; will retry");
        }
        debug!(entries, "reconciled");
        self.known = Some((ownership, known));
        report.failed.is_empty()
    }
}

/// Waits for the next input. Everything the lease watch has queued comes as one input, and so
/// does every kernel notification queued.
async fn next_input(
    leases: &mut mpsc::Receiver<LeaseWatchResult>,
    notifications: &mut Option<Notifications>,
    resync_at: Instant,
    retry_at: Option<Instant>,
    compact_at: Option<Instant>,
    shutdown: &CancellationToken,
) -> Input {
    let at = |when: Option<Instant>| async move {
        match when {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    let (retry, quiet) = (at(retry_at), at(compact_at));
    let kernel = async {
        match notifications.as_mut() {
            Some(n) => n.recv().await.map(|first| (first, n)),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => Input::Shutdown,
        r = leases.recv() => match r {
            Some(first) => {
                let mut all = vec![first];
                while let Ok(more) = leases.try_recv() {
                    all.push(more);
                }
                Input::Leases(all)
            }
            None => Input::WatchEnded,
        },
        Some((first, n)) = kernel => {
            let mut all = vec![first];
            all.extend(n.drain());
            Input::Kernel(all)
        }
        () = tokio::time::sleep_until(resync_at) => Input::Tick,
        () = retry => Input::RetryDue,
        () = quiet => Input::Quiet,
    }
}

/// Runs the loop until `shutdown`. `notifications` delivers kernel changes (see
/// [`crate::netlink::Netlink::subscribe`]); pass `None` to rely on lease events and resyncs only.
///
/// The loop is `Loop` fed with `Input`s: lease results (a pass once the first snapshot is in),
/// kernel notifications (a pass only for news: a burst is collected for `debounce` first), the
/// resync tick (a pass that reads the kernel), the retry after a failed pass, the quiet second after
/// a large change (what the loop keeps is rebuilt compactly and freed memory handed back), shutdown
/// and the end of the watch. A pass reads the kernel only when what the loop knows may be stale (at start, after
/// a failure, a tick or news from the kernel); otherwise lease changes are diffed against what it
/// knows, so a host with many peers does not dump its tables for every lease.
pub async fn run(
    model: &mut dyn Model,
    kernel: &dyn KernelOps,
    sm: Arc<dyn SubnetManager>,
    own: &flannel_core::Lease,
    mut notifications: Option<Notifications>,
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
    let policy = LeasePolicy::new(own.key, &model.desired(&[]).1, &host_routes)
        .with_own_public_ips(own.attrs.public_ips());
    drop(host_routes);
    let mut state = Loop::new(own.key, opts.resync);
    loop {
        if state.pass_due() {
            state.pass(model, kernel, &policy).await;
        }
        let mut input = next_input(
            &mut rx,
            &mut notifications,
            state.resync_at,
            state.retry_at,
            state.compact_at,
            &shutdown,
        )
        .await;
        if let Input::Kernel(changes) = &mut input
            && state.is_news(changes)
        {
            // Collect the rest of the burst before reacting; a stop request ends the wait.
            tokio::select! {
                _ = shutdown.cancelled() => input = Input::Shutdown,
                _ = tokio::time::sleep(opts.debounce) => {
                    if let Some(n) = notifications.as_mut() {
                        changes.extend(n.drain());
                    }
                }
            }
        }
        let ended = matches!(input, Input::WatchEnded);
        if state.on(input) == Flow::Stop {
            if !ended || shutdown.is_cancelled() {
                return Ok(());
            }
            return match watcher.await {
                Ok(Err(e)) => Err(BackendError::Subnet(e)),
                _ => Err(BackendError::Other(
                    "the lease watch stopped unexpectedly".into(),
                )),
            };
        }
    }
}

/// [`run`] on the real kernel: a netlink connection plus notifications (falling back to periodic
/// resyncs if the subscription fails).
pub async fn run_on_netlink(
    model: &mut dyn Model,
    sm: Arc<dyn SubnetManager>,
    own: &flannel_core::Lease,
    shutdown: CancellationToken,
) -> Result<(), BackendError> {
    let kernel = crate::netlink::Netlink::new()?;
    let mut opts = DriverOptions::default();
    if let Some(every) = model.resync_every() {
        opts.resync = every;
    }
    let notifications = match kernel.subscribe() {
        Ok(n) => Some(n),
        Err(e) => {
            warn!(error = %crate::chain(&e), "no netlink notifications; relying on a resync every 10 s");
            opts.resync = opts.resync.min(Duration::from_secs(10));
            None
        }
    };
    run(model, &kernel, sm, own, notifications, opts, shutdown).await
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
        run_on_netlink(&mut model, sm, &lease, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    //! The loop under paused time: waiting for the first snapshot, debounce, backoff after a failed
    //! pass, shutdown during the debounce, and a watch that ends.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::changes::{Entry, NotificationSender, notifications};
    use crate::{DataplaneError, FakeKernel, Op, Route};
    use flannel_core::{LeaseAttrs, LeaseEvent};
    use ipnet::IpNet;

    /// The fake kernel, counting full reads.
    #[derive(Debug, Default)]
    struct CountingKernel {
        inner: FakeKernel,
        reads: AtomicUsize,
    }

    #[async_trait]
    impl KernelOps for CountingKernel {
        async fn read(&self, own: &Ownership) -> Result<KernelState, DataplaneError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.read(own).await
        }
        async fn apply(&self, op: &Op) -> Result<(), DataplaneError> {
            self.inner.apply(op).await
        }
        async fn host_routes(&self) -> Result<Vec<Route>, DataplaneError> {
            self.inner.host_routes().await
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
        leases: flannel_core::testing::Script,
        notify: NotificationSender,
        passes: Arc<AtomicUsize>,
        kernel: Arc<CountingKernel>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), BackendError>>,
    }

    fn start(fail_first: usize) -> Harness {
        start_with(fail_first, Duration::from_secs(600))
    }

    fn start_with(fail_first: usize, resync: Duration) -> Harness {
        let (notify, nrx) = notifications(64);
        let passes = Arc::new(AtomicUsize::new(0));
        let kernel = Arc::new(CountingKernel::default());
        let shutdown = CancellationToken::new();
        let (sm, leases) = flannel_core::testing::ScriptedManager::new();
        let sm: Arc<dyn SubnetManager> = Arc::new(sm);
        let task = {
            let (passes, kernel, shutdown) = (passes.clone(), kernel.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut model = CountingModel { passes, fail_first };
                let opts = DriverOptions {
                    resync,
                    debounce: Duration::from_millis(50),
                };
                let own = flannel_core::testing::peer_lease("10.5.1.0-24", "192.168.0.1", "", None);
                run(
                    &mut model,
                    kernel.as_ref(),
                    sm,
                    &own,
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
            self.leases
                .send(Ok(r))
                .await
                .unwrap_or_else(|_| unreachable!());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        /// Stops the loop; it must end cleanly.
        async fn stop(self) {
            self.shutdown.cancel();
            assert!(self.task.await.unwrap_or_else(|_| unreachable!()).is_ok());
        }
    }

    fn routes(k: &CountingKernel) -> usize {
        k.inner.state.lock().map(|s| s.routes.len()).unwrap_or(0)
    }

    fn reads(h: &Harness) -> usize {
        h.kernel.reads.load(Ordering::SeqCst)
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
            .send(Ok(LeaseWatchResult::Events(vec![
                flannel_core::LeaseEvent::Added(lease("10.5.2.0-24")),
            ])))
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
            assert!(h.notify.send(KernelChange::Other));
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
        assert!(h.notify.send(KernelChange::Other));
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

    #[tokio::test(start_paused = true)]
    async fn lease_changes_are_diffed_against_what_the_loop_knows() {
        let h = start(0);
        h.store_says(LeaseWatchResult::Snapshot(vec![lease("10.5.2.0-24")]))
            .await;
        assert_eq!(reads(&h), 1, "the first pass reads the kernel");
        for i in 3..13 {
            h.store_says(LeaseWatchResult::Events(vec![LeaseEvent::Added(lease(
                &format!("10.5.{i}.0-24"),
            ))]))
            .await;
        }
        assert_eq!(routes(&h.kernel), 11);
        assert_eq!(reads(&h), 1, "lease changes alone never read the kernel");
        h.store_says(LeaseWatchResult::Events(vec![LeaseEvent::Removed(lease(
            "10.5.2.0-24",
        ))]))
        .await;
        assert_eq!(routes(&h.kernel), 10);
        assert_eq!(reads(&h), 1);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn echoes_are_ignored_and_a_removed_entry_is_repaired() {
        let h = start(0);
        h.store_says(LeaseWatchResult::Snapshot(vec![lease("10.5.2.0-24")]))
            .await;
        let ours = h
            .kernel
            .inner
            .state
            .lock()
            .unwrap()
            .routes
            .first()
            .cloned()
            .unwrap();
        let passes = h.passes.load(Ordering::SeqCst);
        // The kernel echoes our own route, and a route elsewhere changes: no news.
        assert!(
            h.notify
                .send(KernelChange::Added(Entry::Route(ours.clone())))
        );
        let mut elsewhere = ours.clone();
        elsewhere.dst = "192.168.0.0/24".parse().unwrap();
        assert!(h.notify.send(KernelChange::Added(Entry::Route(elsewhere))));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            h.passes.load(Ordering::SeqCst),
            passes,
            "no pass for echoes"
        );
        assert_eq!(reads(&h), 1);
        // Someone deletes our route: the loop reads the kernel and puts it back.
        h.kernel.inner.state.lock().unwrap().routes.clear();
        assert!(h.notify.send(KernelChange::Removed(Entry::Route(ours))));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(reads(&h), 2);
        assert_eq!(routes(&h.kernel), 1, "repaired");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_resync_reads_the_kernel_and_repairs_silent_losses() {
        let h = start(0);
        h.store_says(LeaseWatchResult::Snapshot(vec![lease("10.5.2.0-24")]))
            .await;
        // Routes dropped without a notification (a device set down does that).
        h.kernel.inner.state.lock().unwrap().routes.clear();
        tokio::time::sleep(Duration::from_secs(599)).await;
        assert_eq!(routes(&h.kernel), 0, "not before the resync");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(reads(&h), 2);
        assert_eq!(routes(&h.kernel), 1, "repaired at the resync");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_with_many_entries_resyncs_less_often() {
        let h = start_with(0, Duration::from_secs(60));
        // RESYNC_ENTRIES + 1 peers (one route each): the safety net waits 2 x 60 s.
        let many: Vec<Lease> = (0..=RESYNC_ENTRIES as u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a05_4000 + 2 * i);
                lease(&format!("{ip}-31"))
            })
            .collect();
        h.store_says(LeaseWatchResult::Snapshot(many)).await;
        settle().await;
        assert_eq!(routes(&h.kernel), RESYNC_ENTRIES + 1);
        assert_eq!(reads(&h), 1);
        h.kernel.inner.state.lock().unwrap().routes.clear();
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(reads(&h), 1, "no resync after 60 s at this size");
        assert_eq!(routes(&h.kernel), 0);
        tokio::time::sleep(Duration::from_secs(40)).await;
        assert_eq!(reads(&h), 2, "the resync after 120 s");
        assert_eq!(routes(&h.kernel), RESYNC_ENTRIES + 1, "repaired");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_that_grows_without_a_read_gets_the_longer_interval() {
        let h = start_with(0, Duration::from_secs(60));
        h.store_says(LeaseWatchResult::Snapshot(vec![lease("10.5.2.0-24")]))
            .await;
        assert_eq!(reads(&h), 1);
        // 30 s later, RESYNC_ENTRIES more peers arrive as events: diffed, not read.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let many: Vec<LeaseEvent> = (0..RESYNC_ENTRIES as u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a05_4000 + 2 * i);
                LeaseEvent::Added(lease(&format!("{ip}-31")))
            })
            .collect();
        h.store_says(LeaseWatchResult::Events(many)).await;
        settle().await;
        assert_eq!(routes(&h.kernel), RESYNC_ENTRIES + 1);
        assert_eq!(reads(&h), 1);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(reads(&h), 1, "not 60 s after the read: the host has grown");
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert_eq!(reads(&h), 2, "120 s after the read");
        h.stop().await;
    }

    #[test]
    fn the_resync_interval_grows_with_the_entries() {
        let base = Duration::from_secs(60);
        let at = |n| resync_interval(base, n).as_secs();
        assert_eq!(at(0), 60);
        assert_eq!(at(RESYNC_ENTRIES), 60);
        assert_eq!(at(RESYNC_ENTRIES + 1), 120);
        assert_eq!(at(60_000), 360, "20,000 vxlan peers");
        assert_eq!(at(10_000_000), RESYNC_MAX.as_secs(), "capped");
        let long = Duration::from_secs(900);
        assert_eq!(resync_interval(long, 0), long, "never below the base");
        assert_eq!(resync_interval(long, usize::MAX), long);
    }

    #[test]
    fn pass_backoff_doubles_to_ten_seconds() {
        let mut b = pass_backoff();
        let waits: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
    }

    #[test]
    fn a_large_change_is_compacted_once_it_is_over() {
        let mut l = Loop::new("10.5.1.0-24".parse().unwrap(), Duration::from_secs(60));
        let t0 = Instant::now();
        l.count_changes(600, t0);
        assert_eq!(l.compact_at, None, "not a large change yet");
        l.count_changes(600, t0);
        assert_eq!(l.compact_at, Some(t0 + QUIET));
        let t1 = t0 + Duration::from_millis(500);
        l.count_changes(10, t1);
        assert_eq!(
            l.compact_at,
            Some(t1 + QUIET),
            "a pass that changes pushes it back"
        );
        l.count_changes(0, t1 + Duration::from_millis(700));
        assert_eq!(
            l.compact_at,
            Some(t1 + QUIET),
            "a pass that changes nothing does not"
        );
        // Leases count too: a backend may keep state per lease with no kernel entry changing.
        let mut by_leases = Loop::new("10.5.1.0-24".parse().unwrap(), Duration::from_secs(60));
        let many: Vec<Lease> = (0..1200u32)
            .map(|i| lease(&format!("10.{}.{}.0-24", 100 + i / 256, i % 256)))
            .collect();
        let _ = by_leases.on(Input::Leases(vec![LeaseWatchResult::Snapshot(many)]));
        assert!(
            by_leases.compact_at.is_some(),
            "1200 new leases are a large change"
        );
        let mut known = KernelState::default();
        for i in 0..100u32 {
            known.record(&Op::AddRoute(Route {
                dst: IpNet::V4(
                    ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(0x0a05_0000 + (i << 8)), 24)
                        .unwrap(),
                ),
                gateway: None,
                oif: 5,
                onlink: false,
            }));
        }
        l.known = Some((Ownership::default(), known.clone()));
        assert_eq!(l.on(Input::Quiet), Flow::Continue);
        assert_eq!((l.compact_at, l.changed_since_release), (None, 0));
        assert_eq!(l.known.map(|(_, k)| k), Some(known), "the same entries");
        assert!(!l.dirty, "compacting is no reason for a pass");
    }

    #[tokio::test(start_paused = true)]
    async fn the_quiet_time_wakes_the_loop() {
        let (_tx, mut rx) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        let at = Instant::now() + QUIET;
        let resync_at = Instant::now() + Duration::from_secs(60);
        let input = next_input(&mut rx, &mut None, resync_at, None, Some(at), &shutdown).await;
        assert!(matches!(input, Input::Quiet), "{input:?}");
        assert!(Instant::now() >= at);
    }

    #[test]
    fn a_failed_pass_forgets_what_the_loop_knew() {
        let mut l = Loop::new("10.5.1.0-24".parse().unwrap(), Duration::from_secs(60));
        l.known = Some((Ownership::default(), KernelState::default()));
        assert!(!l.is_news(&[KernelChange::OnDevice(3)]));
        assert_eq!(l.on(Input::Tick), Flow::Continue);
        assert!(l.known.is_none() && l.dirty, "a tick always reads");
        assert!(!l.pass_due(), "but not before the first snapshot");
        assert!(
            l.is_news(&[KernelChange::OnDevice(3)]),
            "nothing known: all is news"
        );
        assert_eq!(l.on(Input::WatchEnded), Flow::Stop);
        assert_eq!(l.on(Input::Shutdown), Flow::Stop);
    }
}
