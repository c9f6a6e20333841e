//! Record commands against a running node, through its HTTP API.
//!
//! When `concord run` serves a data dir, its store is locked; the CLI then reads the data dir's
//! config for the API address and asks the node instead, with the same output and exit codes.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use concord::config::{Config, CONFIG_FILE};
use concord::node::NodeError;
use concord::record::{RecordId, RecordWrite};
use serde_json::{Map, Value};

/// How long one API call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `answers` waits for the API to accept a connection (on loopback, at once).
const CONNECT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

pub struct ApiClient {
    base: String,
    agent: ureq::Agent,
}

impl ApiClient {
    pub fn for_data_dir(dir: &std::path::Path) -> Result<Self> {
        let config = Config::load(&dir.join(CONFIG_FILE))?;
        Ok(Self::new(&config.network.api))
    }

    /// Whether something accepts connections at the API's address: a node that runs does;
    /// a store whose lock a process that just closed it still holds for a moment does not.
    pub fn answers(&self) -> bool {
        use std::net::ToSocketAddrs;
        let address = self.base.trim_start_matches("http://");
        address
            .to_socket_addrs()
            .ok()
            .and_then(|mut addresses| addresses.next())
            .is_some_and(|address| {
                std::net::TcpStream::connect_timeout(&address, CONNECT_PROBE_TIMEOUT).is_ok()
            })
    }

    pub fn new(address: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Self {
            base: format!("http://{address}"),
            agent,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn record_path(id: &RecordId) -> String {
        format!(
            "/v1/records/{}/{}",
            id.collection,
            urlencode(id.key.as_str())
        )
    }

    /// Turns a response into its JSON body, or the error the node gave.
    fn answer(
        &self,
        id: Option<&RecordId>,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value> {
        let mut response =
            response.with_context(|| format!("cannot reach the node's API at {}", self.base))?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap_or_default();
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).unwrap_or(Value::String(body))
        };
        match status {
            200..=299 => Ok(value),
            404 => match id {
                Some(id) => Err(NodeError::NotFound(id.clone()).into()),
                None => bail!(
                    "{}",
                    value
                        .get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("not found")
                ),
            },
            _ => bail!(
                "{}",
                value
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the node refused the request")
            ),
        }
    }

    pub fn put(&self, id: &RecordId, write: &RecordWrite) -> Result<()> {
        let url = self.url(&Self::record_path(id));
        let body = write_body(write);
        if write.replace {
            self.answer(Some(id), self.agent.put(&url).send_json(body))?;
        } else {
            self.answer(Some(id), self.agent.patch(&url).send_json(body))?;
        }
        Ok(())
    }

    /// Writes every record of `writes` in one batch, durable together.
    pub fn put_batch(&self, writes: &[(RecordId, RecordWrite)]) -> Result<()> {
        let writes: Vec<Value> = writes
            .iter()
            .map(|(id, write)| batch_entry(id, write))
            .collect();
        let body = serde_json::json!({ "writes": writes });
        self.answer(
            None,
            self.agent.post(&self.url("/v1/batch")).send_json(body),
        )?;
        Ok(())
    }

    pub fn get(&self, id: &RecordId) -> Result<Value> {
        self.answer(
            Some(id),
            self.agent.get(&self.url(&Self::record_path(id))).call(),
        )
    }

    pub fn get_at(&self, id: &RecordId, version: &str) -> Result<Value> {
        let url = format!(
            "{}?at={}",
            self.url(&Self::record_path(id)),
            urlencode(version)
        );
        self.answer(Some(id), self.agent.get(&url).call())
    }

    /// Whether the revert changed anything.
    pub fn revert(&self, id: &RecordId, version: &str) -> Result<bool> {
        let url = self.url(&format!("{}/revert", Self::record_path(id)));
        let answer = self.answer(
            Some(id),
            self.agent
                .post(&url)
                .send_json(serde_json::json!({ "to": version })),
        )?;
        Ok(answer["changed"].as_bool().unwrap_or(true))
    }

    /// An audit report: `{"entries": [...], "truncated": bool}`.
    pub fn audit(&self, filter: &concord::node::AuditFilter) -> Result<Value> {
        let mut query = vec![format!("limit={}", filter.limit)];
        let mut add = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                query.push(format!("{name}={}", urlencode(&value)));
            }
        };
        add(
            "collection",
            filter.collection.as_ref().map(|c| c.as_str().to_owned()),
        );
        add("record", filter.record.as_ref().map(ToString::to_string));
        add("source", filter.source.clone());
        add("node", filter.node.clone());
        let rfc3339 = |seconds: i64| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(u64::try_from(seconds).unwrap_or(0)),
            )
            .to_string()
        };
        add("since", filter.since.map(rfc3339));
        add("until", filter.until.map(rfc3339));
        let url = format!("{}?{}", self.url("/v1/audit"), query.join("&"));
        self.answer(None, self.agent.get(&url).call())
    }

    /// A conflicts report: `{"records": [...], "truncated": bool}`.
    pub fn conflicts(
        &self,
        collection: Option<&concord::record::Collection>,
        limit: usize,
    ) -> Result<Value> {
        let mut url = format!("{}?limit={limit}", self.url("/v1/conflicts"));
        if let Some(collection) = collection {
            url.push_str(&format!("&collection={}", urlencode(collection.as_str())));
        }
        self.answer(None, self.agent.get(&url).call())
    }

    /// The value the settlement wrote.
    pub fn resolve(
        &self,
        id: &RecordId,
        field: &str,
        settlement: &concord::node::Settlement,
    ) -> Result<Value> {
        let url = self.url(&format!("{}/resolve", Self::record_path(id)));
        let body = match settlement {
            concord::node::Settlement::Pick(index) => {
                serde_json::json!({"field": field, "pick": index})
            }
            concord::node::Settlement::Value(value) => {
                serde_json::json!({"field": field, "value": value})
            }
        };
        let answer = self.answer(Some(id), self.agent.post(&url).send_json(body))?;
        Ok(answer["value"].clone())
    }

    pub fn delete(&self, id: &RecordId) -> Result<()> {
        self.answer(
            Some(id),
            self.agent.delete(&self.url(&Self::record_path(id))).call(),
        )?;
        Ok(())
    }

    /// One page of a collection: records and the key to continue after.
    pub fn list(
        &self,
        collection: &str,
        after: Option<&str>,
    ) -> Result<(Vec<Value>, Option<String>)> {
        let mut path = format!("/v1/records/{collection}?limit=1000");
        if let Some(after) = after {
            path.push_str(&format!("&after={}", urlencode(after)));
        }
        let value = self.answer(None, self.agent.get(&self.url(&path)).call())?;
        let records = value["records"].as_array().cloned().unwrap_or_default();
        let next = value["next"].as_str().map(str::to_owned);
        Ok((records, next))
    }

    /// One page of the record's history: up to `limit` changes after `after`.
    pub fn history(&self, id: &RecordId, after: Option<&str>, limit: usize) -> Result<Vec<Value>> {
        let mut path = format!("{}/history?limit={limit}", Self::record_path(id));
        if let Some(after) = after {
            path.push_str(&format!("&after={}", urlencode(after)));
        }
        let value = self.answer(Some(id), self.agent.get(&self.url(&path)).call())?;
        Ok(value.as_array().cloned().unwrap_or_default())
    }

    /// The record's saved Automerge document.
    pub fn export(&self, id: &RecordId) -> Result<Vec<u8>> {
        let url = self.url(&format!("{}/automerge", Self::record_path(id)));
        let mut response = self
            .agent
            .get(&url)
            .call()
            .with_context(|| format!("cannot reach the node's API at {}", self.base))?;
        match response.status().as_u16() {
            200 => Ok(response
                .body_mut()
                .with_config()
                .limit(concord::node::IMPORT_BYTES_MAX as u64)
                .read_to_vec()?),
            404 => Err(NodeError::NotFound(id.clone()).into()),
            _ => {
                let body: Value = response.body_mut().read_json().unwrap_or(Value::Null);
                bail!(
                    "{}",
                    body.get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("the node refused the request")
                )
            }
        }
    }

    /// Merges a saved Automerge document into the record; returns how many changes were new.
    pub fn import(&self, id: &RecordId, bytes: &[u8]) -> Result<u64> {
        let url = self.url(&format!("{}/automerge", Self::record_path(id)));
        let value = self.answer(Some(id), self.agent.post(&url).send(bytes))?;
        Ok(value["new_changes"].as_u64().unwrap_or(0))
    }

    pub fn status(&self) -> Result<Value> {
        self.answer(None, self.agent.get(&self.url("/v1/status")).call())
    }

    pub fn errors(&self) -> Result<Value> {
        self.answer(None, self.agent.get(&self.url("/v1/errors")).call())
    }

    /// Streams the node's backup into `out`; `progress` is told the bytes so far.
    pub fn backup(&self, out: &mut dyn std::io::Write, progress: impl Fn(u64)) -> Result<()> {
        // No overall timeout: a backup takes as long as the store is large.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        let mut response = agent
            .get(&self.url("/v1/backup"))
            .call()
            .with_context(|| format!("cannot reach the node's API at {}", self.base))?;
        if response.status().as_u16() != 200 {
            let body = response.body_mut().read_to_string().unwrap_or_default();
            let value: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
            bail!(
                "{}",
                value
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the node refused the backup")
            );
        }
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let read = std::io::Read::read(&mut reader, &mut buffer)
                .context("the backup stream broke off")?;
            if read == 0 {
                break;
            }
            out.write_all(&buffer[..read])?;
            total += read as u64;
            progress(total);
        }
        Ok(())
    }

    pub fn node_named(&self, name: &str) -> Result<Value> {
        if name.is_empty() {
            return Err(NodeError::UnknownNode(String::new()).into());
        }
        let url = self.url(&format!("/v1/nodes/{}", urlencode(name)));
        self.answer(None, self.agent.get(&url).call())
    }

    pub fn grants(&self) -> Result<Value> {
        self.answer(None, self.agent.get(&self.url("/v1/grants")).call())
    }

    pub fn add_signed(&self, bytes: &[u8]) -> Result<Value> {
        let url = self.url("/v1/grants");
        self.answer(
            None,
            self.agent
                .post(&url)
                .header("content-type", "application/octet-stream")
                .send(bytes),
        )
    }

    pub fn refill(&self, binding: &str) -> Result<Value> {
        let url = self.url(&format!("/v1/bindings/{}/refill", urlencode(binding)));
        self.answer(None, self.agent.post(&url).send_empty())
    }

    pub fn refused(&self) -> Result<Value> {
        self.answer(None, self.agent.get(&self.url("/v1/refused")).call())
    }
}

/// A write as the body of `PUT` (it replaces the record) or `PATCH` (a field set to null is
/// removed).
fn write_body(write: &RecordWrite) -> Map<String, Value> {
    let mut body: Map<String, Value> = write.set.iter().cloned().collect();
    if !write.replace {
        for field in &write.remove {
            body.insert(field.clone(), Value::Null);
        }
    }
    body
}

/// A write as one entry of `POST /v1/batch`.
pub fn batch_entry(id: &RecordId, write: &RecordWrite) -> Value {
    serde_json::json!({
        "id": id.to_string(),
        "fields": write_body(write),
        "replace": write.replace,
    })
}

/// Percent-encodes everything but unreserved characters, for a key inside a URL path.
fn urlencode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
