//! The agent's life: from settings to a running network.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use flannel_core::iface::IfaceSpec;
use flannel_core::{
    BackendContext, NetworkConfig, PreviousSubnets, SubnetEnv, SubnetError, SubnetManager,
    new_backend,
};
use flannel_dataplane::host::select_external_interface;
use flannel_subnet::kube::{
    KubeOptions, KubeSubnetManager, client as kube_client, node_name as kube_node_name,
};
use flannel_subnet::{EtcdRegistry, LocalManager, ManagerOptions, SUBNET_TTL};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{KubeSettings, Settings, Store};

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second one exits at once (128 + signal).
pub(crate) async fn cancel_on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop flanneld with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("received SIGTERM, shutting down"),
        _ = int.recv() => info!("received SIGINT, shutting down"),
    }
    shutdown.cancel();
    let code = tokio::select! {
        _ = term.recv() => 128 + libc::SIGTERM,
        _ = int.recv() => 128 + libc::SIGINT,
    };
    warn!("second stop signal: exiting now");
    std::process::exit(code);
}

/// Waits for a valid network config, retrying every second (a missing or invalid config is logged,
/// never fatal: in etcd mode it may not be written yet, in Kubernetes mode the ConfigMap may not be
/// mounted yet). Returns `None` on shutdown.
async fn wait_for_config(
    sm: &dyn SubnetManager,
    shutdown: &CancellationToken,
) -> Option<NetworkConfig> {
    loop {
        match sm.get_network_config().await {
            Ok(c) => return Some(c),
            Err(e @ SubnetError::ConfigInvalid(_)) => {
                let place = if sm.name() == "kube" {
                    "in the net-conf.json file"
                } else {
                    "in etcd"
                };
                error!(
                    "{}; fix the config {place}, retrying every second",
                    flannel_core::chain(&e)
                )
            }
            Err(e) => warn!("{}; retrying every second", flannel_core::chain(&e)),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The rules `--ip-masq` and `--iptables-forward-rules` ask for, per family in use (IPv4, IPv6 with
/// `EnableIPv6`, or IPv6 alone for an IPv6-only network), as iptables chains or, with
/// `EnableNFTables`, an nftables table; the other mode's leftovers are removed (best effort).
async fn traffic_rules(
    settings: &Settings,
    net: &NetworkConfig,
    lease: &flannel_core::Lease,
) -> anyhow::Result<Option<crate::iptables::TrafficRules>> {
    use crate::iptables::{TrafficRules, forward_rules, masq_rules, supports_random_fully};
    if !settings.ip_masq && !settings.forward_rules {
        return Ok(None);
    }
    // (IPv4 network and subnet, then the IPv6 ones.)
    let mut families = Vec::new();
    if let (Some(n), Some(s)) = (net.network(), lease.subnet()) {
        families.push((IpNet::V4(n), IpNet::V4(s)));
    }
    if let (Some(n6), Some(s6)) = (net.ipv6_network(), lease.ipv6_subnet()) {
        families.push((IpNet::V6(n6), IpNet::V6(s6)));
    }
    if families.is_empty() {
        return Ok(None);
    }
    let random = settings.random_fully;
    if net.enable_nftables {
        let all: Vec<_> = families
            .iter()
            .flat_map(|(n, s)| [masq_rules(*n, *s, false), forward_rules(*n)])
            .collect();
        crate::iptables::remove(&all).await;
        let tables = families
            .iter()
            .map(|(n, s)| {
                crate::nftables::nft_rules(*n, *s, settings.ip_masq, settings.forward_rules, random)
            })
            .collect();
        info!("using nftables (EnableNFTables)");
        return Ok(Some(TrafficRules::Nftables(tables)));
    }
    crate::nftables::remove().await;
    let (version, nft) = crate::iptables::iptables_version()
        .await
        .context("--ip-masq and --iptables-forward-rules need iptables (or pass --iptables-forward-rules=false)")?;
    info!(
        mode = if nft { "nf_tables" } else { "legacy" },
        ?version,
        "using iptables"
    );
    let mut sets = Vec::new();
    for (n, s) in families {
        if settings.ip_masq {
            sets.push(masq_rules(n, s, random && supports_random_fully(version)));
        }
        if settings.forward_rules {
            sets.push(forward_rules(n));
        }
    }
    Ok(Some(TrafficRules::Iptables(sets)))
}

/// The subnet manager the settings name, and (Kubernetes mode) the node's `node-public-ip(v6)`
/// annotations, which stand in for `--public-ip(v6)`.
async fn subnet_manager(
    store: &Store,
    subnet_file: &std::path::Path,
) -> anyhow::Result<(Arc<dyn SubnetManager>, NodePublicIps)> {
    match store {
        Store::Etcd {
            etcd,
            prefix,
            renew_margin,
        } => {
            let registry = EtcdRegistry::connect(etcd)
                .await
                .with_context(|| format!("connecting to etcd at {}", etcd.endpoints.join(",")))?;
            let manager = LocalManager::new(
                registry,
                ManagerOptions {
                    prefix: prefix.clone(),
                    previous: PreviousSubnets::read(subnet_file),
                    renew_margin: *renew_margin,
                    lease_ttl: SUBNET_TTL,
                },
            );
            info!(%prefix, "waiting for the network config in etcd");
            Ok((Arc::new(manager), (None, None)))
        }
        Store::Kube(kube) => {
            let manager = kube_manager(kube).await?;
            let ips = manager.node_public_ips().await.unwrap_or_else(|e| {
                warn!(
                    "{}; not reading the node-public-ip annotations",
                    flannel_core::chain(&e)
                );
                (None, None)
            });
            info!(config = %kube.net_config_path.display(), "waiting for the network config file");
            Ok((Arc::new(manager), ips))
        }
    }
}

/// A node's `node-public-ip` and `node-public-ipv6` annotations.
type NodePublicIps = (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>);

/// The Kubernetes subnet manager the flags describe (`--kube-subnet-mgr`).
async fn kube_manager(kube: &KubeSettings) -> anyhow::Result<KubeSubnetManager> {
    let client = kube_client(kube.api_url.as_deref(), kube.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API")?;
    let node_name = kube_node_name(&client).await?;
    info!(node = %node_name, "Kubernetes subnet manager");
    Ok(KubeSubnetManager::new(
        client,
        KubeOptions {
            node_name,
            annotation_prefix: kube.annotation_prefix.clone(),
            net_config_path: kube.net_config_path.clone(),
            set_node_network_unavailable: kube.set_node_network_unavailable,
            ..KubeOptions::default()
        },
    )?)
}

/// How to choose the external interface: the flags, with the node annotations standing in for
/// unset `--public-ip(v6)`, for the address families the network config has.
fn iface_spec(settings: &Settings, net: &NetworkConfig, node_public: NodePublicIps) -> IfaceSpec {
    IfaceSpec {
        ifaces: settings.iface.names.clone(),
        iface_regexes: settings.iface.regexes.clone(),
        can_reach: settings.iface.can_reach,
        public_ip: settings.public_ip.or(node_public.0),
        public_ipv6: settings.public_ipv6.or(node_public.1),
        ipv4: net.ipv4.is_some(),
        ipv6: net.ipv6.is_some(),
    }
}

/// Writes `subnet.env` for the container runtime and the CNI plugin.
fn write_subnet_env(
    settings: &Settings,
    net: &NetworkConfig,
    lease: &flannel_core::Lease,
    mtu: u32,
) -> anyhow::Result<()> {
    let env = SubnetEnv {
        network: net.network(),
        subnet: lease.subnet(),
        ipv6_network: net.ipv6_network(),
        ipv6_subnet: lease.ipv6_subnet(),
        mtu,
        ip_masq: settings.ip_masq,
    };
    let path = &settings.subnet_file;
    env.write_atomic(path)
        .with_context(|| format!("writing the subnet file {}", path.display()))?;
    info!(path = %path.display(), "wrote subnet file");
    Ok(())
}

/// Keeps the lease and the backend running until shutdown or until either of them ends; then gives
/// the backend a few seconds to finish.
async fn supervise(
    keep_lease: impl std::future::Future<Output = Result<(), SubnetError>>,
    mut net_task: tokio::task::JoinHandle<Result<(), flannel_core::BackendError>>,
    net_stop: CancellationToken,
) -> anyhow::Result<()> {
    tokio::pin!(keep_lease);
    let outcome = tokio::select! {
        r = &mut keep_lease => r.context("keeping the lease"),
        r = &mut net_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the backend stopped")),
            Err(e) => Err(anyhow::anyhow!("the backend task failed: {e}")),
        },
    };
    net_stop.cancel();
    if !net_task.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(5), net_task).await;
    }
    outcome
}

/// Runs the agent until `shutdown` is cancelled (Ok) or something fatal happens (Err), in the
/// start-up order of Go flanneld (spec §8), the health endpoint first so it answers meanwhile.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    for flag in &settings.ignored_flags {
        info!("{flag} is accepted for compatibility with Go flanneld and ignored; use RUST_LOG");
    }
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = settings.healthz {
        crate::health::serve(addr, ready.clone(), shutdown.clone()).await?;
    }
    let (sm, node_public) = subnet_manager(&settings.store, &settings.subnet_file).await?;
    let Some(net) = wait_for_config(sm.as_ref(), &shutdown).await else {
        return Ok(());
    };
    info!(backend = %net.backend_type, network = ?net.network(), ipv6_network = ?net.ipv6_network(), "network config read");

    let ext_iface = select_external_interface(&iface_spec(&settings, &net, node_public))
        .await
        .context("choosing the external interface")?;
    info!(iface = %ext_iface, "using external interface");
    let context = BackendContext {
        subnet_manager: sm.clone(),
        ext_iface,
    };
    let network = new_backend(&net.backend_type, context)?
        .register_network(&net)
        .await
        .with_context(|| format!("setting up the {} backend", net.backend_type))?;
    for name in flannel_dataplane::systemd::release_unclaimed() {
        info!(
            name,
            "closed a descriptor the service manager kept for a backend not in use here"
        );
    }
    let lease = network.lease().clone();
    info!(subnet = %lease.key, mtu = network.mtu(), "lease acquired");
    // (The IPv4 subnet, or the IPv6 one of an IPv6-only network.)
    let label = match (lease.subnet(), lease.ipv6_subnet()) {
        (None, Some(v6)) => v6.to_string(),
        _ => lease.key.ipv4.to_string(),
    };
    flannel_subnet::metrics::metrics().set_lease(&label, lease.expiration);

    if let Some(rules) = traffic_rules(&settings, &net, &lease).await? {
        rules
            .ensure(crate::iptables::Check::Start)
            .await
            .context("installing the masquerade/forward rules")?;
        info!("masquerade/forward rules installed");
        tokio::spawn(crate::iptables::keep(
            rules,
            settings.rules_resync,
            shutdown.clone(),
        ));
    }
    if settings.blackhole_route {
        let own: Vec<IpNet> = [
            lease.subnet().map(IpNet::V4),
            lease.ipv6_subnet().map(IpNet::V6),
        ]
        .into_iter()
        .flatten()
        .collect();
        tokio::spawn(crate::blackhole::keep(
            own,
            settings.rules_resync,
            shutdown.clone(),
        ));
    }
    write_subnet_env(&settings, &net, &lease, network.mtu())?;

    let net_stop = shutdown.child_token();
    let net_task = tokio::spawn(network.run(net_stop.clone()));
    ready.store(true, Ordering::SeqCst);
    flannel_dataplane::systemd::ready();
    info!("running; the data plane and the lease stay in place when flanneld stops");
    supervise(
        sm.complete_lease(lease, shutdown.clone()),
        net_task,
        net_stop,
    )
    .await
}
