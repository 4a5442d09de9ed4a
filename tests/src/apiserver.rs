//! A test API server speaking the Kubernetes list/watch protocol over HTTP,
//! for Services and EndpointSlices: lists carry a resourceVersion, watches
//! are chunked streams of ADDED/MODIFIED/DELETED events with BOOKMARKs, and
//! a watch from a compacted resourceVersion gets a 410 Expired error event,
//! as from a real API server. It listens on loopback inside a namespace of
//! the test's (where the agent runs); the test changes objects directly.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::netns::Netns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }
}

struct WatchEvent {
    resource_version: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    events: Vec<WatchEvent>,
    /// Watches from before this version get 410 Expired.
    oldest_watchable: u64,
    /// Bumped to end every open watch stream.
    generation: u64,
    lists: u64,
    expired: u64,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub struct ApiServer {
    shared: Shared,
    addr: SocketAddr,
    netns_path: std::path::PathBuf,
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl ApiServer {
    /// Starts on a free loopback port inside `netns`.
    pub fn start(netns: &Netns) -> anyhow::Result<Self> {
        let listener = netns.enter(|| TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let mut server = Self { shared: Shared::default(), addr, netns_path: netns.path(), running: None };
        server.serve(listener)?;
        Ok(server)
    }

    fn serve(&mut self, listener: TcpListener) -> anyhow::Result<()> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, flag) = (self.shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (shared, flag) = (shared.clone(), flag.clone());
                        std::thread::spawn(move || {
                            let _ = handle(stream, &shared, &flag);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        self.running = Some((stop, thread));
        Ok(())
    }

    /// Stops listening and ends every connection: the API server is gone.
    pub fn stop(&mut self) {
        if let Some((stop, thread)) = self.running.take() {
            stop.store(true, Ordering::Relaxed);
            self.end_watches();
            let _ = thread.join();
        }
    }

    /// Listens again on the same address.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let addr = self.addr;
        let listener = {
            let path = self.netns_path.clone();
            std::thread::spawn(move || {
                crate::netns::setns(&path)?;
                TcpListener::bind(addr)
            })
            .join()
            .expect("bind thread")?
        };
        self.serve(listener)
    }

    /// Forgets the watch history: clients watching from an older version
    /// get 410 Expired and must list again.
    pub fn compact(&self) {
        let (lock, _) = &*self.shared;
        let mut state = lock.lock().unwrap();
        state.events.clear();
        state.oldest_watchable = state.resource_version + 1;
    }

    /// Ends every open watch stream (clients re-watch from their version).
    pub fn end_watches(&self) {
        let (lock, cvar) = &*self.shared;
        lock.lock().unwrap().generation += 1;
        cvar.notify_all();
    }

    /// Creates or replaces an object (a JSON manifest).
    pub fn apply(&self, kind: Kind, mut object: Value) {
        let (lock, cvar) = &*self.shared;
        let mut state = lock.lock().unwrap();
        state.resource_version += 1;
        let rv = state.resource_version;
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["namespace"].is_null() && kind != Kind::Node {
            object["metadata"]["namespace"] = json!("default");
        }
        let key = key_of(kind, &object);
        // As a real API server: set at creation (to the second), kept by
        // updates. Conflicts between Services go to the older.
        let created = state.objects.get(&key).map(|old| old["metadata"]["creationTimestamp"].clone());
        object["metadata"]["creationTimestamp"] = created.unwrap_or_else(|| {
            let now = k8s_openapi::jiff::Timestamp::now();
            json!(k8s_openapi::jiff::Timestamp::from_second(now.as_second()).unwrap_or(now).to_string())
        });
        let kind_of_event = if state.objects.insert(key, object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        state.events.push(WatchEvent { resource_version: rv, kind, kind_of_event, object });
        cvar.notify_all();
    }

    /// Deletes an object; `namespace` is "" for Nodes.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let (lock, cvar) = &*self.shared;
        let mut state = lock.lock().unwrap();
        let Some(mut object) = state.objects.remove(&(kind, namespace.to_owned(), name.to_owned())) else { return };
        state.resource_version += 1;
        let rv = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.events.push(WatchEvent { resource_version: rv, kind, kind_of_event: "DELETED", object });
        cvar.notify_all();
    }

    /// List requests served so far.
    pub fn lists(&self) -> u64 {
        self.shared.0.lock().unwrap().lists
    }

    /// Watches refused with 410 Expired so far.
    pub fn expired(&self) -> u64 {
        self.shared.0.lock().unwrap().expired
    }

    /// A kubeconfig pointing at this server, written to `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
                self.addr
            ),
        )?;
        Ok(path)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn key_of(kind: Kind, object: &Value) -> (Kind, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (kind, text(&object["metadata"]["namespace"]), text(&object["metadata"]["name"]))
}

fn handle(stream: TcpStream, shared: &Shared, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
    // Only `metadata.name=NAME` field selectors (the agent's Node watch).
    let field_selector = params.get("fieldSelector").map(|f| f.replace("%3D", "="));
    let wanted_name = field_selector.as_deref().and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_owned);
    let selected = move |object: &Value| wanted_name.as_deref().is_none_or(|n| object["metadata"]["name"] == n);
    let mut out = stream;
    let Some(kind) = Kind::from_path(path) else {
        let body =
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
        return respond(&mut out, "404 Not Found", &body);
    };
    if matches!(params.get("watch"), Some(&"true" | &"1")) {
        let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let timeout = params.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300);
        let bookmarks = params.get("allowWatchBookmarks") == Some(&"true");
        watch(&mut out, shared, stop, kind, &selected, from, Duration::from_secs(timeout), bookmarks)
    } else {
        // Paged as a real API server pages (`limit`, `continue`): a client
        // gets 500 objects at a time (kube-rs' default), never one body of
        // every object. The token holds the first page's resourceVersion
        // and the last key sent; changes made meanwhile reach the client
        // through the watch that follows, from that version.
        let limit: usize = params.get("limit").and_then(|v| v.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let token = params.get("continue").map(|t| percent_decode(t));
        let token = token.as_deref().and_then(|t| t.split_once('.'));
        let mut state = shared.0.lock().unwrap();
        state.lists += 1;
        let version = token.and_then(|(v, _)| v.parse().ok()).unwrap_or(state.resource_version);
        // Namespaces hold no '/': the first one ends it.
        let after = token.and_then(|(_, key)| key.split_once('/')).map(|(ns, name)| (ns.to_owned(), name.to_owned()));
        // From the object after the token's, in key order: a page costs
        // its own objects, not a walk from the start.
        let from = match &after {
            Some((ns, n)) => std::ops::Bound::Excluded((kind, ns.clone(), n.clone())),
            None => std::ops::Bound::Included((kind, String::new(), String::new())),
        };
        let mut items: Vec<&Value> = state
            .objects
            .range((from, std::ops::Bound::Unbounded))
            .take_while(|((k, _, _), _)| *k == kind)
            .filter(|(_, v)| selected(v))
            .map(|(_, v)| v)
            .take(limit.saturating_add(1))
            .collect();
        let more = items.len() > limit;
        items.truncate(limit);
        let next = match (more, items.last()) {
            (true, Some(last)) => {
                let meta = &last["metadata"];
                format!(
                    "{version}.{}/{}",
                    meta["namespace"].as_str().unwrap_or(""),
                    meta["name"].as_str().unwrap_or("")
                )
            }
            _ => String::new(),
        };
        let body = json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": version.to_string(), "continue": next},
            "items": items,
        });
        drop(state);
        respond(&mut out, "200 OK", &body)
    }
}

/// A query parameter's value with its %XX escapes (and '+') decoded.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(out: &mut TcpStream, status: &str, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(out: &mut TcpStream, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    write!(out, "{:x}\r\n{line}\r\n", line.len())?;
    out.flush()
}

#[expect(clippy::too_many_arguments, reason = "one watch request's parameters")]
fn watch(
    out: &mut TcpStream,
    shared: &Shared,
    stop: &AtomicBool,
    kind: Kind,
    selected: &dyn Fn(&Value) -> bool,
    mut from: u64,
    timeout: Duration,
    bookmarks: bool,
) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let (lock, cvar) = &**shared;
    let deadline = Instant::now() + timeout;
    let mut state = lock.lock().unwrap();
    let generation = state.generation;
    if from < state.oldest_watchable.saturating_sub(1) {
        state.expired += 1;
        let expired = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", state.oldest_watchable), "reason": "Expired", "code": 410,
        }});
        drop(state);
        chunk(out, &expired)?;
        return write!(out, "0\r\n\r\n");
    }
    let mut last_bookmark = Instant::now();
    while !stop.load(Ordering::Relaxed) && state.generation == generation && Instant::now() < deadline {
        let pending: Vec<Value> = state
            .events
            .iter()
            .filter(|e| e.kind == kind && e.resource_version > from && selected(&e.object))
            .map(|e| json!({"type": e.kind_of_event, "object": e.object}))
            .collect();
        from = state.resource_version;
        let bookmark_due = bookmarks && last_bookmark.elapsed() > Duration::from_secs(1);
        if pending.is_empty() && !bookmark_due {
            // Waiting with the lock held: no change can slip in unseen.
            state = cvar.wait_timeout(state, Duration::from_millis(200)).unwrap().0;
            continue;
        }
        drop(state);
        for event in &pending {
            chunk(out, event)?;
        }
        if bookmark_due {
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "kind": kind.name(), "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": from.to_string()},
            }});
            chunk(out, &bookmark)?;
            last_bookmark = Instant::now();
        }
        state = lock.lock().unwrap();
    }
    drop(state);
    write!(out, "0\r\n\r\n")
}
