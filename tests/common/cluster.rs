//! In-process nodes over real QUIC on loopback, with UDP relays between them so that a test
//! can cut a link (drop every packet both ways) and restore it, as a network partition does.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use concord::node::{InitOptions, Node};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A free loopback port (UDP and TCP are probed separately by the caller's use).
pub fn free_port() -> u16 {
    concord::net::free_loopback_port().unwrap()
}

/// One node: its data dir and, while running, its task.
pub struct TestNode {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub api: String,
    pub name: String,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl TestNode {
    /// Creates a node's data dir with a certificate from `ca`, dialing `peers`.
    pub fn create(parent: &Path, name: &str, ca: &Path, peers: &[SocketAddr]) -> Self {
        Self::create_on(parent, name, ca, peers, None)
    }

    /// [`TestNode::create`], its store on `engine` (the default when `None`).
    pub fn create_on(
        parent: &Path,
        name: &str,
        ca: &Path,
        peers: &[SocketAddr],
        engine: Option<concord::store::Engine>,
    ) -> Self {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        let dir = parent.join(name);
        let options = InitOptions {
            name: Some(name.to_owned()),
            ca: Some(ca.to_owned()),
            listen: Some(listen.to_string()),
            api: Some(api.clone()),
            peers: peers.iter().map(ToString::to_string).collect(),
            engine,
        };
        Node::init_with(&dir, &options).unwrap();
        Self {
            dir,
            listen,
            api,
            name: name.to_owned(),
            running: None,
        }
    }

    /// Rewrites the peers this node dials (takes effect at the next start).
    pub fn set_peers(&self, peers: &[SocketAddr]) {
        let path = self.dir.join("concord.toml");
        let mut config = concord::config::Config::load(&path).unwrap();
        config.network.peers = peers.iter().map(ToString::to_string).collect();
        std::fs::write(&path, config.to_toml()).unwrap();
    }

    /// Replaces this node's conflict policies (takes effect at the next start).
    pub fn set_policies(&self, policies: Vec<concord::config::PolicySection>) {
        let path = self.dir.join("concord.toml");
        let mut config = concord::config::Config::load(&path).unwrap();
        config.policies = policies;
        std::fs::write(&path, config.to_toml()).unwrap();
    }

    /// Sets `store.compact_histories` in the node's config (before it starts).
    pub fn compact_histories(&self, on: bool) {
        let path = self.dir.join("concord.toml");
        let mut config = concord::config::Config::load(&path).unwrap();
        config.store.compact_histories = on;
        std::fs::write(&path, config.to_toml()).unwrap();
    }

    pub async fn start(&mut self) {
        self.start_node(Node::open(&self.dir).unwrap()).await;
    }

    /// Starts this node with deliberate bugs switched on (a `sabotage` build only).
    #[cfg(feature = "sabotage")]
    pub async fn start_sabotaged(&mut self, sabotage: concord::Sabotage) {
        self.start_node(Node::open_sabotaged(&self.dir, sabotage).unwrap())
            .await;
    }

    async fn start_node(&mut self, node: Node) {
        let node = Arc::new(node);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            concord::node::runtime::run(node, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        self.running = Some((stop, task));
        // The API answers once the node is up.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.status().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("node {} did not start", self.name);
    }

    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.await.unwrap();
        }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into()
    }

    pub fn status(&self) -> Option<Value> {
        let mut response = Self::agent()
            .get(format!("http://{}/v1/status", self.api))
            .call()
            .ok()?;
        response.body_mut().read_json().ok()
    }

    pub fn put(&self, id: &str, fields: Value) {
        let response = Self::agent()
            .patch(format!("http://{}/v1/records/{id}", self.api))
            .send_json(fields)
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "put {id} on {}", self.name);
    }

    /// `PUT /v1/records/{id}` with `body` as it is: the status and the JSON answer. Sent as
    /// curl sends a large body, with `Expect: 100-continue`: the body goes only once the node
    /// asks for it, so a body refused from its headers is answered without being sent.
    pub fn put_body(&self, id: &str, body: Vec<u8>) -> (u16, Value) {
        use std::io::{BufRead, BufReader, Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.api).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "PUT /v1/records/{id} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
            self.api,
            body.len()
        )
        .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        // The head of one response: its status and its content-length.
        let read_head = |reader: &mut BufReader<std::net::TcpStream>| {
            let mut status = 0;
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    return (status, length);
                }
                if let Some(rest) = line.strip_prefix("HTTP/1.1 ") {
                    status = rest[..3].parse::<u16>().unwrap();
                } else if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse::<usize>().unwrap();
                    }
                }
            }
        };
        let (mut status, mut length) = read_head(&mut reader);
        if status == 100 {
            stream.write_all(&body).unwrap();
            (status, length) = read_head(&mut reader);
        }
        let mut answer = vec![0; length];
        reader.read_exact(&mut answer).unwrap();
        (
            status,
            serde_json::from_slice(&answer).unwrap_or(Value::Null),
        )
    }

    /// This node's view of `peer` in its status (`None` while not connected).
    pub fn peer_status(&self, peer: &TestNode) -> Option<Value> {
        let id = std::fs::read_to_string(peer.dir.join("node.id")).ok()?;
        let status = self.status()?;
        status["peers"]
            .as_array()?
            .iter()
            .find(|entry| entry["node"].as_str() == Some(id.trim()))
            .cloned()
    }

    /// The record's history, oldest change first.
    pub fn history(&self, id: &str) -> Vec<Value> {
        let mut response = Self::agent()
            .get(format!("http://{}/v1/records/{id}/history", self.api))
            .call()
            .unwrap();
        assert_eq!(
            response.status().as_u16(),
            200,
            "history {id} on {}",
            self.name
        );
        response.body_mut().read_json().unwrap()
    }

    /// `GET /v1/audit?QUERY`: the report.
    pub fn audit(&self, query: &str) -> Value {
        let mut response = Self::agent()
            .get(format!("http://{}/v1/audit?{query}", self.api))
            .call()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "audit on {}", self.name);
        response.body_mut().read_json().unwrap()
    }

    /// Restores the record to `version` with a new change.
    pub fn revert(&self, id: &str, version: &str) {
        let response = Self::agent()
            .post(format!("http://{}/v1/records/{id}/revert", self.api))
            .send_json(serde_json::json!({"to": version}))
            .unwrap();
        assert_eq!(
            response.status().as_u16(),
            200,
            "revert {id} on {}",
            self.name
        );
    }

    pub fn delete(&self, id: &str) {
        let response = Self::agent()
            .delete(format!("http://{}/v1/records/{id}", self.api))
            .call()
            .unwrap();
        assert_eq!(
            response.status().as_u16(),
            204,
            "delete {id} on {}",
            self.name
        );
    }

    /// `POST /v1/batch` with `writes` (each `{"id", "fields"}`), answered once durable; sent
    /// again after a moment while the node pushes writers back (503), as a client would.
    pub fn batch(&self, writes: Vec<Value>) {
        let body = serde_json::json!({ "writes": writes });
        let start = Instant::now();
        loop {
            let response = Self::agent()
                .post(format!("http://{}/v1/batch", self.api))
                .send_json(&body)
                .unwrap();
            let status = response.status().as_u16();
            if status != 503 || start.elapsed() > Duration::from_secs(300) {
                assert_eq!(status, 200, "batch on {}", self.name);
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The record's Automerge document as the node saves it (`GET .../automerge`).
    pub fn automerge(&self, id: &str) -> Vec<u8> {
        let mut response = Self::agent()
            .get(format!("http://{}/v1/records/{id}/automerge", self.api))
            .call()
            .unwrap();
        assert_eq!(
            response.status().as_u16(),
            200,
            "automerge {id} on {}",
            self.name
        );
        response.body_mut().read_to_vec().unwrap()
    }

    /// Whether this node holds the record's document: written here or received, deleted
    /// or not, its history whole or compacted.
    pub fn knows(&self, id: &str) -> bool {
        let response = Self::agent()
            .get(format!("http://{}/v1/records/{id}/automerge", self.api))
            .call()
            .unwrap();
        match response.status().as_u16() {
            200 => true,
            404 => false,
            other => panic!("automerge {id} on {}: HTTP {other}", self.name),
        }
    }

    /// The record, or `None` if not found.
    pub fn get(&self, id: &str) -> Option<Value> {
        let mut response = Self::agent()
            .get(format!("http://{}/v1/records/{id}", self.api))
            .call()
            .unwrap();
        match response.status().as_u16() {
            200 => Some(response.body_mut().read_json().unwrap()),
            404 => None,
            other => panic!("get {id} on {}: HTTP {other}", self.name),
        }
    }

    /// Every conflicting field of `collection`, as `/v1/conflicts` lists them, across records.
    pub fn conflicts(&self, collection: &str) -> Vec<Value> {
        let mut response = Self::agent()
            .get(format!(
                "http://{}/v1/conflicts?collection={collection}",
                self.api
            ))
            .call()
            .unwrap();
        let report: Value = response.body_mut().read_json().unwrap();
        report["records"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|record| record["fields"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The value of the series `name` (with its labels, if any) in `/metrics`, 0 if absent.
    pub fn metric(&self, name: &str) -> u64 {
        let mut response = Self::agent()
            .get(format!("http://{}/metrics", self.api))
            .call()
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }
}

/// A cluster CA in `parent/ca` and one started node per name, each dialing those before it.
pub async fn start_mesh(parent: &Path, names: &[&str]) -> Vec<TestNode> {
    start_mesh_on(parent, names, None).await
}

/// [`start_mesh`], every store on `engine` (the default when `None`).
pub async fn start_mesh_on(
    parent: &Path,
    names: &[&str],
    engine: Option<concord::store::Engine>,
) -> Vec<TestNode> {
    let ca = parent.join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let mut nodes: Vec<TestNode> = Vec::new();
    for name in names {
        let peers: Vec<SocketAddr> = nodes.iter().map(|node| node.listen).collect();
        nodes.push(TestNode::create_on(parent, name, &ca, &peers, engine));
    }
    for node in &mut nodes {
        node.start().await;
    }
    nodes
}

/// Polls until every node returns the same value for every id, or panics after `timeout`.
pub async fn converge(nodes: &[&TestNode], ids: &[&str], timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let mut same = true;
        for id in ids {
            let first = nodes[0].get(id);
            if nodes.iter().any(|node| !node.knows(id))
                || nodes[1..].iter().any(|node| node.get(id) != first)
            {
                same = false;
                break;
            }
        }
        if same {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            let mut report = String::new();
            for id in ids {
                for node in nodes {
                    report.push_str(&format!(
                        "{} {id}: {:?}{}\n",
                        node.name,
                        node.get(id),
                        if node.knows(id) {
                            ""
                        } else {
                            " (never written here)"
                        }
                    ));
                }
            }
            panic!("no convergence within {timeout:?}:\n{report}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until `check` holds, or panics with `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            panic!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
