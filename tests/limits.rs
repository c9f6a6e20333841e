//! Large records end to end over real QUIC: a write larger than one change may be is refused
//! at the door (413, nothing stored, replication unharmed), one just under a frame travels,
//! and everything after it keeps flowing.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{eventually, TestNode};
use concord::record::document::CHANGE_BYTES_MAX;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_write_is_refused_and_a_large_one_replicates() {
    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let mut a = TestNode::create(temp.path(), "a", &ca, &[]);
    let mut b = TestNode::create(temp.path(), "b", &ca, &[a.listen]);
    a.start().await;
    b.start().await;
    eventually("connected", WITHIN, || {
        a.peer_status(&b)
            .is_some_and(|peer| peer["state"] == json!("ready"))
    })
    .await;

    // 5 MB: over the change limit. Refused at once with the limit named; nothing stored.
    let big = json!({"blob": "x".repeat(5_000_000)})
        .to_string()
        .into_bytes();
    let (status, answer) = a.put_body("t/big", big);
    assert_eq!(status, 413, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains(&CHANGE_BYTES_MAX.to_string()) && error.contains("nothing was stored"),
        "{error}"
    );
    assert_eq!(a.get("t/big"), None);
    // A body over the API's own limit: the same kind of answer.
    let huge = json!({"blob": "y".repeat(9_000_000)})
        .to_string()
        .into_bytes();
    let (status, answer) = a.put_body("t/huge", huge);
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("limit"),
        "{answer}"
    );

    // 3 MB: under the limit, so it goes, in one frame, and so does what follows.
    let value = "z".repeat(3_000_000);
    let started = Instant::now();
    let (status, answer) = a.put_body("t/large", json!({"blob": value}).to_string().into_bytes());
    assert_eq!(status, 200, "{answer}");
    a.put("t/after", json!({"y": 2}));
    eventually("the large record on b", WITHIN, || {
        b.get("t/large")
            .is_some_and(|record| record["blob"].as_str().map(str::len) == Some(3_000_000))
    })
    .await;
    eventually("the later write on b", WITHIN, || {
        b.get("t/after").is_some()
    })
    .await;
    // b's lag for a's log returns to nothing: the summaries say it holds all of it.
    eventually("b's lag back to 0", WITHIN, || {
        a.peer_status(&b)
            .is_some_and(|peer| peer["lag"] == json!(0))
    })
    .await;
    assert!(started.elapsed() < WITHIN);
    assert_eq!(b.get("t/big"), None);
    a.put("t/later", json!({"z": 3}));
    eventually("a write after all that", WITHIN, || {
        b.get("t/later").is_some()
    })
    .await;
    a.stop().await;
    b.stop().await;
}
