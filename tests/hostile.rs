//! What a hostile but realistic user tried, each reproduced as it was found and now refused
//! or answered as the README says: a grant widened by a comma in a value, times with an
//! offset, limits of 0, errors that were not JSON, a batch body the README showed and the API
//! refused, reads of Concord's own collections, revoking twice, granting a revoked node, an
//! empty node name, and a failed restore that left a data dir behind.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cluster::{start_mesh, TestNode};
use common::{concord, concord_bare, ok, stderr, stdout};
use serde_json::{json, Value};

/// A cluster CA and one stopped node in it, named `name`.
fn node_in_cluster(parent: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let ca = parent.join("ca");
    ok(concord_bare(&["ca", "init", ca.to_str().unwrap()]));
    let dir = parent.join(name);
    ok(concord_bare(&[
        "init",
        dir.to_str().unwrap(),
        "--name",
        name,
        "--ca",
        ca.to_str().unwrap(),
    ]));
    (ca, dir)
}

fn grant_lines(dir: &Path) -> Vec<Value> {
    ok(concord(dir, &["grants"]))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn a_comma_in_a_scope_value_never_starts_another_scope() {
    let temp = tempfile::tempdir().unwrap();
    let (ca, dir) = node_in_cluster(temp.path(), "edge");
    let ca = ca.to_str().unwrap();
    // As found: a value with a comma widened the grant to the whole collection `dc`.
    ok(concord(
        &dir,
        &[
            "grant",
            "edge",
            "--ca",
            ca,
            "--read",
            "customers:city=Washington,dc",
        ],
    ));
    let grants = grant_lines(&dir);
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0]["read"], json!(["customers:city=Washington,dc"]));
    // The quoted form names the same value (it failed before).
    ok(concord(
        &dir,
        &[
            "grant",
            "edge",
            "--ca",
            ca,
            "--read",
            "customers:city=\"Washington,dc\"",
            "--read",
            "orders",
        ],
    ));
    let grants = grant_lines(&dir);
    assert_eq!(
        grants[0]["read"],
        json!(["customers:city=Washington,dc", "orders"])
    );
    // A list given the old way is refused, saying how to give several.
    let listed = concord(&dir, &["grant", "edge", "--ca", ca, "--read", "gw,c"]);
    assert_eq!(listed.status.code(), Some(1), "{}", stderr(&listed));
    assert!(
        stderr(&listed).contains("one scope per flag"),
        "{}",
        stderr(&listed)
    );
    // And the help no longer says peers' changes go unchecked.
    let help = stdout(&concord_bare(&["grant", "--help"]));
    assert!(!help.contains("does not yet filter"), "{help}");
    assert!(help.contains("repeat the flag"), "{help}");
}

#[test]
fn revoking_twice_granting_a_revoked_node_and_an_empty_name_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let (ca, dir) = node_in_cluster(temp.path(), "hq");
    let ca = ca.to_str().unwrap();
    let other = "0123456789abcdef0123456789abcdef";
    ok(concord(&dir, &["revoke", other, "--ca", ca]));
    let again = concord(&dir, &["revoke", other, "--ca", ca]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already revoked"),
        "{}",
        stderr(&again)
    );
    let granted = concord(&dir, &["grant", other, "--ca", ca, "--read", "customers"]);
    assert_eq!(granted.status.code(), Some(1), "{}", stderr(&granted));
    assert!(
        stderr(&granted).contains("is revoked"),
        "{}",
        stderr(&granted)
    );
    let listed = grant_lines(&dir);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["revoked"], json!(true));
    let empty = concord(&dir, &["grant", "", "--ca", ca, "--read", "customers"]);
    assert_eq!(empty.status.code(), Some(1), "{}", stderr(&empty));
    assert!(
        stderr(&empty).contains("no node named \"\""),
        "{}",
        stderr(&empty)
    );
}

#[test]
fn a_failed_restore_leaves_no_data_dir_behind() {
    let temp = tempfile::tempdir().unwrap();
    let (ca, _) = node_in_cluster(temp.path(), "hq");
    let bad = temp.path().join("bad.backup");
    std::fs::write(&bad, b"not a backup at all").unwrap();
    let target = temp.path().join("restored");
    let restored = concord_bare(&[
        "restore",
        bad.to_str().unwrap(),
        target.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ]);
    assert_ne!(restored.status.code(), Some(0), "{}", stderr(&restored));
    assert!(
        !target.exists(),
        "a failed restore left {}",
        target.display()
    );
}

/// A raw request: its status, content type and body.
fn request(node: &TestNode, method: &str, path: &str, body: Option<&str>) -> (u16, String, Value) {
    let body = body.unwrap_or("");
    let (status, content_type, bytes) =
        send(node, method, path, "application/json", body.as_bytes());
    let text = String::from_utf8_lossy(&bytes);
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text.into_owned()));
    (status, content_type, value)
}

/// Asserts a JSON error with `status` whose text holds `text`.
fn json_error(answer: (u16, String, Value), status: u16, text: &str) {
    let (got, content_type, body) = answer;
    assert_eq!(got, status, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}: {body}"
    );
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(text), "{error:?} lacks {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_api_error_is_json_with_a_listed_status_and_limits_mean_what_they_say() {
    let temp = tempfile::tempdir().unwrap();
    let [mut node]: [TestNode; 1] = start_mesh(temp.path(), &["hq"])
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    for key in 0..3 {
        node.put(&format!("customers/{key}"), json!({"n": key}));
    }
    // `?limit=0` listed one record; now it is refused, as is -1 (plain text before).
    json_error(
        request(&node, "GET", "/v1/records/customers?limit=0", None),
        400,
        "at least 1",
    );
    json_error(
        request(&node, "GET", "/v1/audit?limit=0", None),
        400,
        "at least 1",
    );
    json_error(
        request(&node, "GET", "/v1/records/customers?limit=-1", None),
        400,
        "limit",
    );
    let (status, _, page) = request(&node, "GET", "/v1/records/customers?limit=2", None);
    assert_eq!(
        (status, page["records"].as_array().unwrap().len()),
        (200, 2)
    );
    // A key with an unencoded slash, a wrong method: JSON, not an empty body.
    json_error(
        request(&node, "GET", "/v1/records/customers/a/b", None),
        404,
        "%2F",
    );
    json_error(
        request(&node, "POST", "/v1/records/customers/1", Some("{}")),
        405,
        "POST",
    );
    // A body of the wrong shape is a 400 like any bad request, not 422.
    json_error(
        request(&node, "PUT", "/v1/records/customers/1", Some("[1]")),
        400,
        "",
    );
    // Concord's own collections read alike by list, history and get.
    let (status, _, actors) = request(&node, "GET", "/v1/records/_actors?limit=2", None);
    assert_eq!(status, 200, "{actors}");
    let key = actors["records"][0]["key"].as_str().unwrap().to_owned();
    let (status, _, _) = request(
        &node,
        "GET",
        &format!("/v1/records/_actors/{key}/history"),
        None,
    );
    assert_eq!(status, 200);
    let (status, _, actor) = request(&node, "GET", &format!("/v1/records/_actors/{key}"), None);
    assert_eq!(status, 200, "{actor}");
    assert!(actor["node"].is_string(), "{actor}");
    // Writing them stays reserved.
    json_error(
        request(
            &node,
            "PUT",
            &format!("/v1/records/_actors/{key}"),
            Some("{\"x\":1}"),
        ),
        400,
        "reserved",
    );
    // Times: RFC 3339 with any offset; without one, refused.
    let (status, _, _) = request(
        &node,
        "GET",
        "/v1/audit?since=2026-12-06T00:00:00%2B01:00",
        None,
    );
    assert_eq!(status, 200);
    json_error(
        request(&node, "GET", "/v1/audit?since=2026-12-06T00:00:00", None),
        400,
        "RFC 3339",
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_batch_api_takes_the_body_the_readme_shows_and_names_the_failing_write() {
    let temp = tempfile::tempdir().unwrap();
    let [mut node]: [TestNode; 1] = start_mesh(temp.path(), &["hq"])
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    node.put("c/1", json!({"name": "Ada", "city": "London"}));
    // The body the README shows, as written there.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let shown = r#"{"writes": [{"id": "c/1", "fields": {"name": "Ada L"}}, {"id": "c/2", "fields": {"name": "Bea"}, "replace": true}]}"#;
    assert!(
        readme.contains(shown),
        "the README shows another batch body"
    );
    let (status, _, answer) = request(&node, "POST", "/v1/batch", Some(shown));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["written"], json!(2));
    // Merged by default: the field not given stays.
    assert_eq!(
        node.get("c/1"),
        Some(json!({"name": "Ada L", "city": "London"}))
    );
    assert_eq!(node.get("c/2"), Some(json!({"name": "Bea"})));
    // The shape the README showed before, and a field it does not take, are refused by name.
    json_error(
        request(
            &node,
            "POST",
            "/v1/batch",
            Some(r#"{"records": [{"id": "c/3", "fields": {}}]}"#),
        ),
        400,
        "records",
    );
    json_error(
        request(
            &node,
            "POST",
            "/v1/batch",
            Some(r#"{"writes": [{"id": "c/3", "fields": {"a": 1}, "merge": false}]}"#),
        ),
        400,
        "merge",
    );
    // A write the store refuses names its index, and nothing of the batch is stored.
    let big = "x".repeat(3 * 1024 * 1024);
    let body = json!({"writes": [
        {"id": "c/4", "fields": {"a": 1}},
        {"id": "c/5", "fields": {"a": big, "b": big}},
    ]})
    .to_string();
    let (status, _, answer) = request(&node, "POST", "/v1/batch", Some(&body));
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().starts_with("write 1:"),
        "{answer}"
    );
    assert_eq!(node.get("c/4"), None);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_node_backs_off_and_stops_dialing_once_it_knows() {
    let temp = tempfile::tempdir().unwrap();
    let [mut hq, mut edge]: [TestNode; 2] = start_mesh(temp.path(), &["hq", "edge"])
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    let ca = temp.path().join("ca");
    let ca = ca.to_str().unwrap();
    common::cluster::eventually("edge and hq connect", Duration::from_secs(20), || {
        hq.peer_status(&edge)
            .is_some_and(|peer| peer["state"] == json!("ready"))
    })
    .await;
    common::cluster::eventually("hq knows edge by name", Duration::from_secs(20), || {
        concord(&hq.dir, &["revoke", "edge", "--ca", ca])
            .status
            .success()
    })
    .await;
    // As found, edge redialed about 20 times a second and hq logged each refusal. Now a
    // refusal it recognizes holds it off for a minute, and one whose reason the TLS handshake
    // lost backs off as a failed dial (up to 4 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused_before = hq.metric("concord_handshakes_refused_total");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let refused = hq.metric("concord_handshakes_refused_total") - refused_before;
    assert!(
        refused <= 3,
        "edge dialed hq {refused} times in 6 s after its revocation"
    );
    // Why, as edge sees it: hq refuses it, or (hq ships a revocation as soon as it is stored,
    // often before it closes the connection) edge holds its own revocation already.
    let status = edge.status().unwrap();
    let said = status["unreachable"].to_string();
    assert!(
        said.contains("refuses this node as revoked") || said.contains("this node was revoked"),
        "{status}"
    );

    // Once edge holds its own revocation, it dials no more and says why. hq shipped it the
    // moment it was stored, so edge may hold it already; if not, it is stored there now.
    let revoke = concord(&edge.dir, &["revoke", "edge", "--ca", ca]);
    assert!(
        revoke.status.success() || common::stderr(&revoke).contains("is already revoked"),
        "{}",
        common::stderr(&revoke)
    );
    common::cluster::eventually("edge stops dialing", Duration::from_secs(20), || {
        edge.status().is_some_and(|status| {
            status["unreachable"]
                .to_string()
                .contains("this node was revoked")
        })
    })
    .await;
    hq.stop().await;
    edge.stop().await;
}

/// A request sent for one the README shows: method, path, body, and the status expected.
type Sent = (&'static str, String, String, u16);

/// The requests the README's text shows, one per inline code span that starts with a method
/// (the README is read, so a request added there and not here fails this test).
fn readme_requests() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut text = String::new();
    let mut fenced = false;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            text.push_str(line);
            text.push(' ');
        }
    }
    let methods = ["GET", "PUT", "PATCH", "DELETE", "POST"];
    let mut requests: Vec<String> = text
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| span.contains(" /") && methods.iter().any(|method| span.starts_with(method)))
        .map(|span| span.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    requests.sort();
    requests.dedup();
    requests
}

/// Sends `method path` with `body` (of `content_type`); the status, the answer's content type
/// and its bytes.
fn send(
    node: &TestNode,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let request = ureq::http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", node.api))
        .header("content-type", content_type)
        .body(body.to_vec())
        .unwrap();
    let mut response = agent.run(request).unwrap();
    let status = response.status().as_u16();
    let answered_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_vec()
        .unwrap();
    (status, answered_type, bytes)
}

/// A record `c/9` whose field `address` two writers set at once: a conflict to resolve.
fn conflicting_record(node: &TestNode) {
    use automerge::transaction::Transactable;
    node.put("c/9", json!({"name": "Ada"}));
    let (status, _, saved) = send(
        node,
        "GET",
        "/v1/records/c/9/automerge",
        "application/json",
        b"",
    );
    assert_eq!(status, 200);
    let base = automerge::Automerge::load(&saved).unwrap();
    let mut sides = Vec::new();
    for (actor, address) in [([1u8; 16], "10 Downing St"), ([2u8; 16], "221B Baker St")] {
        let mut side = base.fork();
        side.set_actor(automerge::ActorId::from(actor));
        let mut tx = side.transaction();
        tx.put(automerge::ROOT, "address", address).unwrap();
        tx.commit();
        sides.push(side);
    }
    let mut merged = sides.pop().unwrap();
    merged.merge(&mut sides[0]).unwrap();
    let (status, _, answer) = send(
        node,
        "POST",
        "/v1/records/c/9/automerge",
        "application/octet-stream",
        &merged.save(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_the_readme_shows_is_answered_as_it_says() {
    let temp = tempfile::tempdir().unwrap();
    let [mut node]: [TestNode; 1] = start_mesh(temp.path(), &["hq"])
        .await
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    node.put("c/0", json!({"name": "Zed"}));
    conflicting_record(&node);
    let first_change = {
        let (status, _, history) = send(
            &node,
            "GET",
            "/v1/records/c/0/history",
            "application/json",
            b"",
        );
        assert_eq!(status, 200);
        let history: Value = serde_json::from_slice(&history).unwrap();
        history[0]["hash"].as_str().unwrap().to_owned()
    };
    let batch = r#"{"writes": [{"id": "c/1", "fields": {"name": "Ada L"}}, {"id": "c/2", "fields": {"name": "Bea"}, "replace": true}]}"#;
    let json = "application/json";
    // Each request as the README shows it, with what each one's placeholders stand for here,
    // and the status it answers. A binding the node does not have is not found, as a JSON
    // error naming it.
    let shown: Vec<(&str, Vec<Sent>)> = vec![
        ("GET/PUT/PATCH/DELETE /v1/records/{collection}/{key}", vec![
            ("PUT", "/v1/records/c/1".into(), r#"{"name": "Ada", "city": "London"}"#.into(), 200),
            ("PATCH", "/v1/records/c/1".into(), r#"{"city": null, "tags": {"a": 1}}"#.into(), 200),
            ("GET", "/v1/records/c/1".into(), String::new(), 200),
            ("DELETE", "/v1/records/c/1".into(), String::new(), 204),
        ]),
        ("POST /v1/batch", vec![("POST", "/v1/batch".into(), batch.into(), 200)]),
        ("GET /v1/records/{collection}?after=KEY&limit=N", vec![
            ("GET", "/v1/records/c?after=0&limit=2".into(), String::new(), 200),
        ]),
        ("GET /v1/records/{collection}/{key}/history?after=HASH&limit=N", vec![
            ("GET", format!("/v1/records/c/0/history?after={first_change}&limit=5"), String::new(), 200),
        ]),
        ("GET/POST /v1/records/{collection}/{key}/automerge", vec![
            ("GET", "/v1/records/c/0/automerge".into(), String::new(), 200),
        ]),
        ("GET /v1/status", vec![("GET", "/v1/status".into(), String::new(), 200)]),
        ("GET /metrics", vec![("GET", "/metrics".into(), String::new(), 200)]),
        ("GET /v1/refused", vec![("GET", "/v1/refused".into(), String::new(), 200)]),
        ("GET /v1/backup", vec![("GET", "/v1/backup".into(), String::new(), 200)]),
        ("GET /v1/errors", vec![("GET", "/v1/errors".into(), String::new(), 200)]),
        ("GET /v1/grants", vec![("GET", "/v1/grants".into(), String::new(), 200)]),
        ("POST /v1/bindings/{name}/refill", vec![
            ("POST", "/v1/bindings/orders/refill".into(), String::new(), 404),
        ]),
        ("GET /v1/audit?collection=&record=&source=&node=&since=&until=&limit=", vec![
            ("GET", "/v1/audit?collection=&record=&source=&node=&since=&until=&limit=".into(), String::new(), 200),
            ("GET", "/v1/audit?collection=c&record=c/0&node=hq&since=2026-01-01T00:00:00%2B01:00&until=2999-01-01T00:00:00Z&limit=5".into(), String::new(), 200),
        ]),
        ("GET /v1/conflicts?collection=&limit=", vec![
            ("GET", "/v1/conflicts?collection=&limit=".into(), String::new(), 200),
            ("GET", "/v1/conflicts?collection=c&limit=5".into(), String::new(), 200),
        ]),
        ("POST /v1/records/{collection}/{key}/resolve", vec![
            ("POST", "/v1/records/c/9/resolve".into(), r#"{"field": "address", "pick": 1}"#.into(), 200),
            ("POST", "/v1/records/c/9/resolve".into(), r#"{"field": "address", "value": "10 Downing St"}"#.into(), 200),
        ]),
    ];
    let listed: Vec<String> = shown
        .iter()
        .map(|(readme, _)| (*readme).to_owned())
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        readme_requests(),
        sorted,
        "the README's requests and this test's differ"
    );
    for (readme, sent) in &shown {
        for (method, path, body, expected) in sent {
            let (status, _, answer) = send(&node, method, path, json, body.as_bytes());
            let text = String::from_utf8_lossy(&answer);
            assert_eq!(status, *expected, "{readme}: {method} {path}: {text}");
            if status >= 400 {
                let error: Value = serde_json::from_slice(&answer).unwrap();
                assert!(error["error"].is_string(), "{readme}: {text}");
            }
        }
    }
    // The conflict is settled, with the value the second request gave.
    assert_eq!(node.get("c/9").unwrap()["address"], json!("10 Downing St"));
    // The saved document merged back in: `POST .../automerge`.
    let (_, _, saved) = send(&node, "GET", "/v1/records/c/0/automerge", json, b"");
    let (status, _, answer) = send(
        &node,
        "POST",
        "/v1/records/c/0/automerge",
        "application/octet-stream",
        &saved,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    // The error body the README shows.
    let (status, _, answer) = send(&node, "GET", "/v1/records/c/absent", json, b"");
    assert_eq!(status, 404);
    let error: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(
        error.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["error"]
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_history_lists_in_one_pass_and_other_reads_do_not_wait_for_it() {
    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let mut node = TestNode::create_on(temp.path(), "hq", &ca, &[], None);
    // Kept whole: once stable (this node knows no other, so within a report interval), a
    // compacted history would list as one entry and the changes after it.
    node.compact_histories(false);
    node.start().await;
    node.put("cold/1", json!({"n": 0}));
    // As found: 5,000 changes took 6 s to list (quadratic), and a GET of another record
    // waited 21-22 s behind it.
    for batch in 0..5 {
        let writes: Vec<Value> = (0..1000)
            .map(|n| json!({"id": "hot/1", "fields": {"n": batch * 1000 + n}}))
            .collect();
        let body = json!({ "writes": writes }).to_string();
        let (status, _, answer) = request(&node, "POST", "/v1/batch", Some(&body));
        assert_eq!(status, 200, "{answer}");
    }
    let api = node.api.clone();
    let listing = std::thread::spawn(move || {
        let begin = std::time::Instant::now();
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let changes: Vec<Value> = agent
            .get(format!("http://{api}/v1/records/hot/1/history?limit=10000"))
            .call()
            .unwrap()
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_json()
            .unwrap();
        (changes.len(), begin.elapsed())
    });
    let mut slowest = Duration::ZERO;
    while !listing.is_finished() {
        let begin = std::time::Instant::now();
        assert!(node.get("cold/1").is_some());
        slowest = slowest.max(begin.elapsed());
    }
    let (listed, took) = listing.join().unwrap();
    assert_eq!(listed, 5000);
    assert!(
        took < Duration::from_secs(3),
        "5,000 changes listed in {took:?}"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "a GET of another record took {slowest:?} while the history was listed"
    );
    node.stop().await;
}
