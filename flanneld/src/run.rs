//! The agent's life: from settings to a running network.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use flannel_core::iface::IfaceSpec;
use flannel_core::{
    BackendContext, NetworkConfig, PreviousSubnets, SubnetEnv, SubnetError, SubnetManager,
    new_backend,
};
use flannel_dataplane::host::select_external_interface;
use flannel_subnet::kube::{
    KubeOptions, KubeSubnetManager, client as kube_client, node_name as kube_node_name,
};
use flannel_subnet::{EtcdConfig, EtcdRegistry, LocalManager, ManagerOptions, SUBNET_TTL};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

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

/// Returns freed heap memory to the OS every few seconds (glibc keeps it otherwise, so resident
/// memory would stay at the peak of the largest netlink dump).
pub(crate) async fn trim_memory_periodically(shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory; it has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Tells systemd we are ready (`Type=notify`), when `$NOTIFY_SOCKET` is set.
fn sd_notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "sd_notify failed");
            return;
        }
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = result {
        warn!(error = %e, "sd_notify failed");
    }
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

/// The rules `--ip-masq` and `--iptables-forward-rules` ask for (IPv4), as iptables chains or, with
/// `EnableNFTables`, an nftables table; the other mode's leftovers are removed (best effort).
async fn traffic_rules(
    config: &crate::Config,
    net: &NetworkConfig,
    lease: &flannel_core::Lease,
) -> anyhow::Result<Option<crate::iptables::TrafficRules>> {
    use crate::iptables::{TrafficRules, forward_rules, masq_rules, supports_random_fully};
    let (Some(network), Some(subnet)) = (net.network(), lease.subnet()) else {
        return Ok(None);
    };
    if !config.ip_masq && !config.iptables_forward_rules {
        return Ok(None);
    }
    // (IPv4 network and subnet, then the IPv6 ones with EnableIPv6.)
    let mut families = vec![(IpNet::V4(network), IpNet::V4(subnet))];
    if let (Some(n6), Some(s6)) = (net.ipv6_network(), lease.ipv6_subnet()) {
        families.push((IpNet::V6(n6), IpNet::V6(s6)));
    }
    let random = !config.ip_masq_fully_random_disable;
    if net.enable_nftables {
        let all: Vec<_> = families
            .iter()
            .flat_map(|(n, s)| [masq_rules(*n, *s, false), forward_rules(*n)])
            .collect();
        crate::iptables::remove(&all).await;
        let tables = families
            .iter()
            .map(|(n, s)| {
                crate::nftables::nft_rules(
                    *n,
                    *s,
                    config.ip_masq,
                    config.iptables_forward_rules,
                    random,
                )
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
        if config.ip_masq {
            sets.push(masq_rules(n, s, random && supports_random_fully(version)));
        }
        if config.iptables_forward_rules {
            sets.push(forward_rules(n));
        }
    }
    Ok(Some(TrafficRules::Iptables(sets)))
}

/// The etcd subnet manager the flags describe.
async fn etcd_manager(config: &crate::Config) -> anyhow::Result<Arc<dyn SubnetManager>> {
    let etcd = EtcdConfig {
        endpoints: config.endpoints(),
        keyfile: opt(&config.etcd_keyfile),
        certfile: opt(&config.etcd_certfile),
        cafile: opt(&config.etcd_cafile),
        username: opt(&config.etcd_username),
        password: opt(&config.etcd_password),
        dial_timeout: None,
    };
    if etcd.endpoints.is_empty() {
        bail!(
            "--etcd-endpoints is empty; give at least one etcd URL such as http://127.0.0.1:2379"
        );
    }
    let registry = EtcdRegistry::connect(&etcd)
        .await
        .with_context(|| format!("connecting to etcd at {}", config.etcd_endpoints))?;
    let previous = PreviousSubnets::read(&config.subnet_file);
    let margin_minutes = u64::try_from(config.subnet_lease_renew_margin).unwrap_or(60);
    Ok(Arc::new(LocalManager::new(
        registry,
        ManagerOptions {
            prefix: config.etcd_prefix.clone(),
            previous,
            renew_margin: Duration::from_secs(margin_minutes * 60),
            lease_ttl: SUBNET_TTL,
        },
    )))
}

/// The Kubernetes subnet manager the flags describe (`--kube-subnet-mgr`).
async fn kube_manager(config: &crate::Config) -> anyhow::Result<KubeSubnetManager> {
    let kubeconfig = opt(&config.kubeconfig_file).map(std::path::PathBuf::from);
    let client = kube_client(opt(&config.kube_api_url).as_deref(), kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API")?;
    let node_name = kube_node_name(&client).await?;
    info!(node = %node_name, "Kubernetes subnet manager");
    Ok(KubeSubnetManager::new(
        client,
        KubeOptions {
            node_name,
            annotation_prefix: config.kube_annotation_prefix.clone(),
            net_config_path: config.net_config_path.clone().into(),
            set_node_network_unavailable: config.set_node_network_unavailable,
            ..KubeOptions::default()
        },
    )?)
}

/// Runs the agent until `shutdown` is cancelled (Ok) or something fatal happens (Err).
pub async fn run(config: crate::Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !config.vmodule.is_empty() || !config.log_backtrace_at.is_empty() {
        info!(
            "--vmodule and --log_backtrace_at are accepted for compatibility and ignored; use RUST_LOG"
        );
    }
    let ready = Arc::new(AtomicBool::new(false));
    if config.healthz_port > 0 {
        crate::health::serve(
            &config.healthz_ip,
            config.healthz_port,
            ready.clone(),
            shutdown.clone(),
        )
        .await?;
    }

    // The store: Node objects (--kube-subnet-mgr) or etcd. In Kubernetes mode the node's
    // node-public-ip(v6) annotations stand in for --public-ip(v6).
    let (sm, node_public): (Arc<dyn SubnetManager>, _) = if config.kube_subnet_mgr {
        let km = kube_manager(&config).await?;
        let ips = km.node_public_ips().await.unwrap_or_else(|e| {
            warn!(
                "{}; not reading the node-public-ip annotations",
                flannel_core::chain(&e)
            );
            (None, None)
        });
        info!(config = %config.net_config_path, "waiting for the network config file");
        (Arc::new(km), ips)
    } else {
        let sm = etcd_manager(&config).await?;
        info!(prefix = %config.etcd_prefix, "waiting for the network config in etcd");
        (sm, (None, None))
    };
    let Some(net) = wait_for_config(sm.as_ref(), &shutdown).await else {
        return Ok(());
    };
    info!(backend = %net.backend_type, network = ?net.network(), ipv6_network = ?net.ipv6_network(), "network config read");

    let spec = IfaceSpec {
        ifaces: config.iface.clone(),
        iface_regexes: config.iface_regex.clone(),
        can_reach: opt(&config.iface_can_reach).and_then(|s| s.parse::<IpAddr>().ok()),
        public_ip: opt(&config.public_ip)
            .and_then(|s| s.parse().ok())
            .or(node_public.0),
        public_ipv6: opt(&config.public_ipv6)
            .and_then(|s| s.parse().ok())
            .or(node_public.1),
        ipv4: net.ipv4.is_some(),
        ipv6: net.ipv6.is_some(),
    };
    let ext_iface = select_external_interface(&spec)
        .await
        .context("choosing the external interface")?;
    info!(iface = %ext_iface, "using external interface");

    let backend = new_backend(
        &net.backend_type,
        BackendContext {
            subnet_manager: sm.clone(),
            ext_iface,
        },
    )?;
    let network = backend
        .register_network(&net)
        .await
        .with_context(|| format!("setting up the {} backend", net.backend_type))?;
    let lease = network.lease().clone();
    info!(subnet = %lease.key, mtu = network.mtu(), "lease acquired");
    flannel_subnet::metrics::metrics().set_lease(&lease.key.ipv4.to_string(), lease.expiration);

    if let Some(rules) = traffic_rules(&config, &net, &lease).await? {
        rules
            .ensure()
            .await
            .context("installing the masquerade/forward rules")?;
        info!("masquerade/forward rules installed");
        let every = Duration::from_secs(config.iptables_resync.max(1));
        tokio::spawn(crate::iptables::keep(rules, every, shutdown.clone()));
    }

    let env = SubnetEnv {
        network: net.network(),
        subnet: lease.subnet(),
        ipv6_network: net.ipv6_network(),
        ipv6_subnet: lease.ipv6_subnet(),
        mtu: network.mtu(),
        ip_masq: config.ip_masq,
    };
    env.write_atomic(&config.subnet_file)
        .with_context(|| format!("writing the subnet file {}", config.subnet_file.display()))?;
    info!(path = %config.subnet_file.display(), "wrote subnet file");

    let net_stop = shutdown.child_token();
    let mut net_task = tokio::spawn(network.run(net_stop.clone()));
    ready.store(true, Ordering::SeqCst);
    sd_notify_ready();
    info!("running; the data plane and the lease stay in place when flanneld stops");

    let keep = sm.complete_lease(lease, shutdown.clone());
    tokio::pin!(keep);
    let outcome = tokio::select! {
        r = &mut keep => r.context("keeping the lease"),
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
