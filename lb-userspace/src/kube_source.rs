//! The Kubernetes source: reflectors (list, then watch, with backoff) on
//! Services and EndpointSlices of every namespace.
//!
//! The stores keep the last listed state while the API server is away, so
//! the datapath keeps serving it; after a reconnect or a 410 Gone the
//! watcher lists again and the store is swapped whole when the list is
//! complete, so a sync never sees half a relist.
use std::{path::PathBuf, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::Notify;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error(
        "no API server configuration (no --kubeconfig, KUBECONFIG, ~/.kube/config or in-cluster service account): {0}"
    )]
    Infer(kube::config::InferConfigError),
    #[error("--k8s-api-server {url:?}: {message}")]
    ApiServerUrl { url: String, message: String },
    #[error("building the API client: {0}")]
    Client(#[from] kube::Error),
}

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// A kubeconfig file; otherwise KUBECONFIG, ~/.kube/config or in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the server address: a kube-proxy replacement cannot use the
    /// `kubernetes` Service's ClusterIP, which it is itself serving.
    pub api_server: Option<String>,
}

async fn client_config(connection: &Connection) -> Result<Config, KubeSourceError> {
    let mut config = match &connection.kubeconfig {
        Some(path) => {
            let err = |source| KubeSourceError::Kubeconfig { path: path.clone(), source };
            let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.map_err(err)?
        }
        None => match (Config::infer().await, &connection.api_server) {
            (Ok(config), _) => config,
            // Only a server address: talk to it without credentials.
            (Err(_), Some(url)) => Config::new(parse_url(url)?),
            (Err(e), None) => return Err(KubeSourceError::Infer(e)),
        },
    };
    if let Some(url) = &connection.api_server {
        config.cluster_url = parse_url(url)?;
    }
    Ok(config)
}

fn parse_url(url: &str) -> Result<http::Uri, KubeSourceError> {
    url.parse().map_err(|e: http::uri::InvalidUri| KubeSourceError::ApiServerUrl {
        url: url.to_owned(),
        message: e.to_string(),
    })
}

pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    changed: Arc<Notify>,
}

/// The cluster autoscaler's taint on a node it is about to remove.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should keep sending to this node (kube-proxy's
/// `nodeEligible`): not when it is being deleted or drained for deletion.
pub fn node_eligible(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

impl KubeSource {
    /// Starts the reflectors; they run until the process ends.
    pub async fn start(connection: &Connection, node_name: &str) -> Result<Self, KubeSourceError> {
        let config = client_config(connection).await?;
        info!(api_server = %config.cluster_url, node = node_name, "watching Services, EndpointSlices and this Node");
        let client = Client::try_from(config)?;
        let changed = Arc::new(Notify::new());
        let all = watcher::Config::default();
        let services = spawn_reflector(Api::<Service>::all(client.clone()), all.clone(), "Service", changed.clone());
        let slices = spawn_reflector(Api::<EndpointSlice>::all(client.clone()), all, "EndpointSlice", changed.clone());
        let this_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let node = spawn_reflector(Api::<Node>::all(client), this_node, "Node", changed.clone());
        Ok(Self { services, slices, node, changed })
    }

    /// This node's eligibility for load-balancer traffic; eligible while
    /// its Node object is unknown.
    pub fn node_eligible(&self) -> bool {
        self.node.state().first().is_none_or(|n| node_eligible(n))
    }

    /// Returns when both kinds have been listed once and something changed
    /// since the last call. Cancel-safe.
    pub async fn changed(&self) {
        // Readiness first: a sync from half-listed stores would delete
        // services that are merely not listed yet.
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        self.changed.notified().await;
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services.state()
    }

    pub fn slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.slices.state()
    }
}

fn spawn_reflector<K>(api: Api<K>, config: watcher::Config, kind: &'static str, changed: Arc<Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => {
                    if std::mem::take(&mut failing) {
                        info!(kind, "watch resumed");
                    }
                    changed.notify_one();
                }
                // The backoff retries; the store keeps the last known state.
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(kind, "watch failed, serving the last known state and retrying: {e}");
                    }
                }
            }
        }
    });
    store
}
