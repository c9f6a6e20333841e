//! `concord demo`: three sites on loopback, a partition, and convergence.
//!
//! Three real nodes (QUIC, mutual TLS from a fresh cluster CA, data dirs in a temporary
//! folder) run in this process; every link goes through a UDP relay so the demo can cut one
//! site off the network. It writes at every site, cuts `nyc` off, writes on both sides of the
//! cut (the same record included), heals, and times how long every site takes to agree.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use concord::net::relay::Relay;
use concord::node::{InitOptions, Node};
use concord::record::{RecordId, RecordWrite};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::remote::ApiClient;

/// How long the demo waits for sites to agree before it gives up.
const CONVERGE_WAIT_MAX: Duration = Duration::from_secs(60);
const SITES: [&str; 3] = ["paris", "tokyo", "nyc"];

struct Site {
    name: &'static str,
    api: ApiClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), concord::node::NodeError>>>,
}

pub fn run(dir: Option<PathBuf>, out: &mut dyn Write) -> Result<()> {
    let temporary = match dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("concord-demo-").tempdir()?),
    };
    let root = match (&dir, &temporary) {
        (Some(dir), _) => dir.clone(),
        (None, Some(temporary)) => temporary.path().to_owned(),
        (None, None) => unreachable!("a temporary folder exists when no dir was given"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(demo(&root, out))
}

fn write(site: &Site, id: &str, fields: Value, out: &mut dyn Write) -> Result<()> {
    let id = RecordId::parse_user(id)?;
    let write = RecordWrite {
        set: fields
            .as_object()
            .context("fields are an object")?
            .clone()
            .into_iter()
            .collect(),
        ..RecordWrite::default()
    };
    site.api.put(&id, &write)?;
    writeln!(out, "  {:<6} writes {id} {fields}", site.name)?;
    Ok(())
}

fn read(site: &Site, id: &str) -> Option<Value> {
    let id = RecordId::parse_user(id).ok()?;
    site.api.get(&id).ok()
}

async fn converge(sites: &[Site], ids: &[&str]) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let agreed = ids.iter().all(|id| {
            let first = read(&sites[0], id);
            sites[1..].iter().all(|site| read(site, id) == first)
        });
        if agreed {
            return Ok(start.elapsed());
        }
        if start.elapsed() > CONVERGE_WAIT_MAX {
            bail!("the sites did not agree within {CONVERGE_WAIT_MAX:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_peers(site: &Site, count: usize) -> Result<()> {
    let start = Instant::now();
    loop {
        let peers = site
            .api
            .status()
            .ok()
            .and_then(|status| status["peers"].as_array().map(Vec::len));
        if peers == Some(count) {
            return Ok(());
        }
        if start.elapsed() > CONVERGE_WAIT_MAX {
            bail!("{} did not reach {count} peers", site.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn demo(root: &Path, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "# Concord demo: three sites, one partition, no master")?;
    let ca = root.join("ca");
    let cluster = concord::net::tls::create_ca(&ca)?;
    writeln!(
        out,
        "created cluster CA {} in {}",
        hex::encode(cluster),
        ca.display()
    )?;

    let (mut sites, relays) = start_sites(root, &ca, out).await?;
    let ids = ["customers/42", "customers/43", "orders/1", "orders/2"];
    writes_at_every_site(&sites, &ids, out).await?;
    partition(&sites, &relays, out).await?;
    heal(&sites, &relays, &ids, out).await?;
    for site in &mut sites {
        if let Some(stop) = site.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = site.task.take() {
            task.await??;
        }
    }
    writeln!(out, "\nstopped all sites cleanly")?;
    Ok(())
}

/// Starts the three sites, each dialing its peers through a relay per pair (dialed by the
/// first site of the pair; cutting the relay cuts the link), and waits until all connect.
async fn start_sites(
    root: &Path,
    ca: &Path,
    out: &mut dyn Write,
) -> Result<(Vec<Site>, Vec<((usize, usize), Relay)>)> {
    // Data dirs and certificates first, so every site's listen address is known.
    let mut listens = Vec::new();
    let mut apis = Vec::new();
    for _ in SITES {
        listens.push(SocketAddr::from((
            [127, 0, 0, 1],
            concord::net::free_loopback_port()?,
        )));
        apis.push(format!("127.0.0.1:{}", concord::net::free_loopback_port()?));
    }
    // One relay per pair, dialed by the first site of the pair; cutting it cuts the link.
    let mut relays: Vec<((usize, usize), Relay)> = Vec::new();
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        relays.push(((a, b), Relay::start(listens[b]).await?));
    }
    let mut sites = Vec::new();
    for (index, name) in SITES.iter().enumerate() {
        let peers = relays
            .iter()
            .filter(|((a, _), _)| *a == index)
            .map(|(_, relay)| relay.address.to_string())
            .collect();
        let options = InitOptions {
            name: Some((*name).to_owned()),
            ca: Some(ca.to_path_buf()),
            listen: Some(listens[index].to_string()),
            api: Some(apis[index].clone()),
            peers,
            engine: None,
        };
        let dir = root.join(name);
        let node = Arc::new(Node::create(&dir, &options)?);
        let id = node.id();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(concord::node::runtime::run(node, async {
            let _ = stopped.await;
        }));
        writeln!(
            out,
            "started {name:<6} node {id}: QUIC {} API {}",
            listens[index], apis[index]
        )?;
        sites.push(Site {
            name,
            api: ApiClient::new(&apis[index]),
            stop: Some(stop),
            task: Some(task),
        });
    }
    for site in &sites {
        wait_for_peers(site, 2).await?;
    }
    writeln!(
        out,
        "all three sites connected (mutual TLS, one QUIC connection per pair)"
    )?;

    Ok((sites, relays))
}

async fn writes_at_every_site(sites: &[Site], ids: &[&str], out: &mut dyn Write) -> Result<()> {
    writeln!(out, "\n## Writes at every site")?;
    write(
        &sites[0],
        "customers/42",
        json!({"name": "Ada Lovelace", "city": "London"}),
        out,
    )?;
    write(
        &sites[1],
        "customers/43",
        json!({"name": "Grace Hopper"}),
        out,
    )?;
    write(
        &sites[2],
        "orders/1",
        json!({"customer": "42", "total": 120}),
        out,
    )?;
    let took = converge(sites, ids).await?;
    writeln!(
        out,
        "  every site agrees after {:.1} ms",
        took.as_secs_f64() * 1000.0
    )?;

    Ok(())
}

async fn partition(
    sites: &[Site],
    relays: &[((usize, usize), Relay)],
    out: &mut dyn Write,
) -> Result<()> {
    writeln!(out, "\n## Cut nyc off the network")?;
    for ((a, b), relay) in relays {
        if *a == 2 || *b == 2 {
            relay.set_cut(true);
        }
    }
    wait_for_peers(&sites[2], 0).await?;
    writeln!(
        out,
        "  nyc has no peers left; paris and tokyo still see each other"
    )?;
    write(&sites[0], "customers/42", json!({"city": "Paris"}), out)?;
    write(
        &sites[2],
        "customers/42",
        json!({"phone": "+1 212 555 0100"}),
        out,
    )?;
    write(
        &sites[2],
        "orders/2",
        json!({"customer": "43", "total": 75}),
        out,
    )?;
    write(
        &sites[1],
        "customers/43",
        json!({"rank": "Rear Admiral"}),
        out,
    )?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    writeln!(
        out,
        "  paris sees customers/42 as {}",
        read(&sites[0], "customers/42").unwrap_or(Value::Null)
    )?;
    writeln!(
        out,
        "  nyc   sees customers/42 as {}",
        read(&sites[2], "customers/42").unwrap_or(Value::Null)
    )?;
    writeln!(
        out,
        "  paris sees orders/2 as {}",
        read(&sites[0], "orders/2").map_or("nothing (not yet)".to_owned(), |v| v.to_string())
    )?;

    Ok(())
}

async fn heal(
    sites: &[Site],
    relays: &[((usize, usize), Relay)],
    ids: &[&str],
    out: &mut dyn Write,
) -> Result<()> {
    writeln!(out, "\n## Heal the network")?;
    let healed = Instant::now();
    for (_, relay) in relays {
        relay.set_cut(false);
    }
    converge(sites, ids).await?;
    writeln!(
        out,
        "  every site agrees {:.1} s after healing (reconnect included)",
        healed.elapsed().as_secs_f64()
    )?;
    for id in ids.iter().copied() {
        writeln!(
            out,
            "  {id}: {}",
            read(&sites[0], id).unwrap_or(Value::Null)
        )?;
        for site in &sites[1..] {
            if read(site, id) != read(&sites[0], id) {
                bail!("{} disagrees on {id}", site.name);
            }
        }
    }
    writeln!(
        out,
        "  (the same on paris, tokyo and nyc: both sides' edits of customers/42 were kept)"
    )?;

    Ok(())
}
