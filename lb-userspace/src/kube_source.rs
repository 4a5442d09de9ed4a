//! The Kubernetes source: watchers (list, then watch, with backoff) on
//! Services and EndpointSlices of every namespace, and a reflector on this
//! Node.
//!
//! The watchers report changes, not snapshots: each event becomes a
//! `Changes` entry for the model, which keeps what it needs of each object
//! (`ParsedService`, `ParsedSlice`, read as the event arrives), so no copy
//! of the objects is held, here or there. While the API server is away nothing changes
//! and the datapath keeps serving the last known state; after a reconnect
//! or a 410 Gone the watcher lists again, and objects that the new list
//! lacks are reported deleted once it is complete, so a sync never sees
//! half a relist as deletions.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::model::{Changes, Key, NodeNames, NodeView, ParsedService, ParsedSlice, key_of};

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
    shared: Arc<Shared>,
    node: Store<Node>,
}

/// What the watcher tasks hand the agent.
#[derive(Default)]
struct Shared {
    changes: Mutex<Changes>,
    /// Kinds listed completely at least once (Service, EndpointSlice).
    listed: Mutex<HashSet<&'static str>>,
    /// This Node changed (its eligibility is read at the next sync).
    node_changed: std::sync::atomic::AtomicBool,
    changed: Notify,
}

impl Shared {
    fn changes(&self) -> std::sync::MutexGuard<'_, Changes> {
        // A panic elsewhere while holding the lock leaves Changes whole.
        self.changes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_listed(&self) -> bool {
        self.listed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len() == 2
    }
}

impl KubeSource {
    /// Starts the watchers; they run until the process ends.
    pub async fn start(connection: &Connection, node_name: &str) -> Result<Self, KubeSourceError> {
        let config = client_config(connection).await?;
        info!(api_server = %config.cluster_url, node = node_name, "watching Services, EndpointSlices and this Node");
        let client = Client::try_from(config)?;
        let shared = Arc::new(Shared::default());
        let all = watcher::Config::default();
        spawn_watcher(Api::<Service>::all(client.clone()), all.clone(), shared.clone(), ServiceEvents);
        spawn_watcher(Api::<EndpointSlice>::all(client.clone()), all, shared.clone(), SliceEvents::default());
        let this_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        let node = spawn_reflector(Api::<Node>::all(client), this_node, shared.clone());
        Ok(Self { shared, node })
    }

    /// What the agent needs of this node's Node object.
    pub fn node(&self) -> NodeView {
        NodeView::of(self.node.state().first().map(AsRef::as_ref))
    }

    /// Returns when both kinds have been listed once and something changed
    /// since the last `take_changes`. Cancel-safe.
    pub async fn changed(&self) {
        // Listed first: a sync before both lists are whole would delete
        // the Services merely not listed yet from adopted maps.
        loop {
            if self.shared.is_listed()
                && (!self.shared.changes().is_empty()
                    || self.shared.node_changed.swap(false, std::sync::atomic::Ordering::Relaxed))
            {
                return;
            }
            self.shared.changed.notified().await;
        }
    }

    /// The changes since the last call.
    pub fn take_changes(&self) -> Changes {
        std::mem::take(&mut *self.shared.changes())
    }
}

/// How one kind's objects become changes.
trait Events: Send + 'static {
    type Object: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static;
    const KIND: &'static str;
    fn report(&mut self, changes: &mut Changes, key: Key, now: Option<Self::Object>);
}

struct ServiceEvents;

impl Events for ServiceEvents {
    type Object = Service;
    const KIND: &'static str = "Service";
    fn report(&mut self, changes: &mut Changes, key: Key, now: Option<Service>) {
        // Parsed here, as it arrives: the object is dropped at once.
        changes.service(key, now.map(|service| ParsedService::parse(&service)));
    }
}

#[derive(Default)]
struct SliceEvents {
    nodes: NodeNames,
}

impl Events for SliceEvents {
    type Object = EndpointSlice;
    const KIND: &'static str = "EndpointSlice";
    fn report(&mut self, changes: &mut Changes, key: Key, now: Option<EndpointSlice>) {
        // Parsed here, as it arrives: the object is dropped at once.
        changes.slice(key, now.map(|slice| ParsedSlice::parse(&slice, &mut self.nodes)));
    }
}

fn spawn_watcher<E: Events>(api: Api<E::Object>, config: watcher::Config, shared: Arc<Shared>, mut events: E) {
    let kind = E::KIND;
    let stream = watcher(api, config).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        // The objects reported present, with their resource versions, and
        // during a (re)list those listed so far: at its end, the others are
        // gone. A relist reports only objects whose version moved.
        let mut known: HashMap<Key, Option<String>> = HashMap::new();
        let mut listing: Option<HashSet<Key>> = None;
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                // The backoff retries; the model keeps the last known state.
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(kind, "watch failed, serving the last known state and retrying: {e}");
                    }
                    continue;
                }
            };
            if std::mem::take(&mut failing) {
                info!(kind, "watch resumed");
            }
            match event {
                watcher::Event::Init => listing = Some(HashSet::new()),
                watcher::Event::InitApply(object) | watcher::Event::Apply(object) => {
                    let key = key_of(object.meta());
                    if let Some(listed) = &mut listing {
                        listed.insert(key.clone());
                    }
                    let version = object.meta().resource_version.clone();
                    if version.is_some() && known.get(&key) == Some(&version) {
                        continue;
                    }
                    known.insert(key.clone(), version);
                    events.report(&mut shared.changes(), key, Some(object));
                }
                watcher::Event::Delete(object) => {
                    let key = key_of(object.meta());
                    known.remove(&key);
                    events.report(&mut shared.changes(), key, None);
                }
                watcher::Event::InitDone => {
                    let listed = listing.take().unwrap_or_default();
                    let mut changes = shared.changes();
                    known.retain(|key, _| {
                        let present = listed.contains(key);
                        if !present {
                            events.report(&mut changes, key.clone(), None);
                        }
                        present
                    });
                    drop(changes);
                    shared.listed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(kind);
                }
            }
            shared.changed.notify_one();
        }
    });
}

fn spawn_reflector<K>(api: Api<K>, config: watcher::Config, shared: Arc<Shared>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if event.is_ok() {
                shared.node_changed.store(true, std::sync::atomic::Ordering::Relaxed);
                shared.changed.notify_one();
            }
        }
    });
    store
}
