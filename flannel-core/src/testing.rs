//! Test helpers (feature `test-util`): a subnet manager whose lease watch the test scripts, for
//! tests of backends' and drivers' lease handling without a store.

use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Lease, LeaseAttrs, LeaseWatchResult, NetworkConfig, SubnetError, SubnetKey};

/// What a test sends to a [`ScriptedManager`]'s watch: `Ok(result)` is delivered, `Err(e)` ends
/// the watch with `e`; dropping the sender ends it without an error.
pub type Script = mpsc::Sender<Result<LeaseWatchResult, SubnetError>>;

/// A subnet manager whose one lease watch delivers what the test sends through its [`Script`]. The
/// other methods fail with "unused" (renewals succeed, `complete_lease` returns at once).
#[derive(Debug)]
pub struct ScriptedManager {
    watch: Mutex<Option<mpsc::Receiver<Result<LeaseWatchResult, SubnetError>>>>,
}

impl ScriptedManager {
    /// A manager and the sender that scripts its lease watch.
    pub fn new() -> (Self, Script) {
        let (tx, rx) = mpsc::channel(16);
        (
            Self {
                watch: Mutex::new(Some(rx)),
            },
            tx,
        )
    }
}

fn unused() -> SubnetError {
    SubnetError::Other("unused by this test".into())
}

#[async_trait]
impl crate::SubnetManager for ScriptedManager {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn get_network_config(&self) -> Result<NetworkConfig, SubnetError> {
        Err(unused())
    }

    async fn acquire_lease(&self, _: &LeaseAttrs) -> Result<Lease, SubnetError> {
        Err(unused())
    }

    async fn renew_lease(&self, _: &mut Lease) -> Result<(), SubnetError> {
        Ok(())
    }

    async fn watch_leases(
        &self,
        sink: mpsc::Sender<LeaseWatchResult>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        let script = self.watch.lock().ok().and_then(|mut w| w.take());
        let Some(mut script) = script else {
            return Err(SubnetError::Other("the scripted watch runs once".into()));
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                r = script.recv() => match r {
                    Some(Ok(r)) => {
                        let _ = sink.send(r).await;
                    }
                    Some(Err(e)) => return Err(e),
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

/// A peer's lease for a test: `key` as the store writes it (`10.5.2.0-24`), its `PublicIP`, its
/// `BackendType` (`""`: none) and backend data, no expiration.
///
/// # Panics
/// When `key` or `public_ip` does not parse (a mistake in the test).
pub fn peer_lease(
    key: &str,
    public_ip: &str,
    backend_type: &str,
    data: Option<serde_json::Value>,
) -> Lease {
    Lease {
        key: key
            .parse()
            .unwrap_or_else(|e| panic!("test lease key {key}: {e}")),
        enable_ipv4: true,
        attrs: LeaseAttrs {
            public_ip: public_ip
                .parse()
                .unwrap_or_else(|e| panic!("test lease public IP {public_ip}: {e}")),
            backend_type: crate::backend_type_of(backend_type),
            backend_data: data.as_ref().map(crate::RawJson::from_value),
            ..Default::default()
        },
        expiration: None,
        asof: 0,
    }
}
