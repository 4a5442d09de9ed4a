//! Health-check node ports: for each LoadBalancer Service with
//! externalTrafficPolicy Local, an HTTP server on its healthCheckNodePort
//! that tells the cloud load balancer whether this node has endpoints of
//! it, exactly as kube-proxy's answers: 200 with the local endpoint count
//! when there are some, 503 when there are none.
use std::{
    collections::BTreeMap,
    net::Ipv6Addr,
    sync::{Arc, Mutex},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    model::HealthCheck,
    status::{read_request_path, respond},
};

/// The body kube-proxy serves, and whether it goes with 200.
pub fn answer(check: &HealthCheck) -> (bool, String) {
    let body = serde_json::json!({
        "service": { "namespace": check.namespace, "name": check.name },
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    (check.local_endpoints > 0, body.to_string())
}

/// One health-check node port: its Service's state, shared with a task
/// per listener (one per family, or one for both).
type Server = (Arc<Mutex<HealthCheck>>, Vec<JoinHandle<()>>);

/// The running servers, by port. Each reads its Service's current state
/// from a shared slot, so an endpoint change needs no restart. They run on
/// the serving runtime (`status::serving_runtime`), never behind a sync.
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
    runtime: tokio::runtime::Handle,
}

impl HealthCheckServers {
    pub fn new(runtime: tokio::runtime::Handle) -> Self {
        Self { servers: BTreeMap::new(), runtime }
    }

    /// Starts, updates and stops servers to match `wanted`. A port that
    /// cannot be bound is reported and tried again on the next update.
    pub fn update(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, (_, tasks)| {
            let keep = wanted.contains_key(port);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
                info!(port, "health-check node port closed");
            }
            keep
        });
        for (port, check) in wanted {
            if let Some((slot, _)) = self.servers.get(port) {
                *slot.lock().expect("health-check lock") = check.clone();
                continue;
            }
            // Unspecified: both families, for load balancers of either.
            let listeners = match crate::status::listen(&self.runtime, (Ipv6Addr::UNSPECIFIED, *port).into()) {
                Ok(listeners) => listeners,
                Err(e) => {
                    warn!("Service {}/{}: spec.healthCheckNodePort {port}: {e}", check.namespace, check.name);
                    continue;
                }
            };
            info!(port, service = %format!("{}/{}", check.namespace, check.name), "health-check node port open");
            let slot = Arc::new(Mutex::new(check.clone()));
            let tasks = listeners.into_iter().map(|l| self.runtime.spawn(serve(l, slot.clone()))).collect();
            self.servers.insert(*port, (slot, tasks));
        }
    }
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for (_, tasks) in self.servers.values() {
            tasks.iter().for_each(JoinHandle::abort);
        }
    }
}

async fn serve(listener: TcpListener, slot: Arc<Mutex<HealthCheck>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let slot = slot.clone();
        tokio::spawn(async move {
            // kube-proxy answers every path the same way.
            if read_request_path(&mut stream).await.is_none() {
                return;
            }
            let (healthy, body) = answer(&slot.lock().expect("health-check lock"));
            let status = if healthy { "200 OK" } else { "503 Service Unavailable" };
            respond(&mut stream, status, "application/json", &body).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_like_kube_proxy() {
        let mut check = HealthCheck { namespace: "shop".into(), name: "web".into(), local_endpoints: 2 };
        let (healthy, body) = answer(&check);
        assert!(healthy);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["service"]["namespace"], "shop");
        assert_eq!(body["service"]["name"], "web");
        assert_eq!(body["localEndpoints"], 2);
        assert_eq!(body["serviceProxyHealthy"], true);
        check.local_endpoints = 0;
        assert!(!answer(&check).0);
    }
}
