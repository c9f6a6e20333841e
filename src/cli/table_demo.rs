//! `concord demo`: two sites keep one `customers` table in step, offline edits included.
//!
//! Two real nodes (QUIC, mutual TLS from a fresh cluster CA, data dirs in a temporary
//! folder) run in this process, each with a binding to its own database: `hq` to PostgreSQL
//! when a server answers (in a database made for the demo and dropped after it), otherwise to
//! SQLite; `depot` always to SQLite. The one link between them goes through a UDP relay, so
//! the demo can take `depot` offline. Every edit is plain SQL against a table, as a user's
//! application would make it; nothing else tells Concord about it. Last, a third site, the edge
//! office `paris` (SQLite), joins granted only the customers in Paris: its table follows that
//! scope as customers move in and out, and its row outside the grant stays in its quarantine.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use concord::config::{AdapterKind, BindingSection, Config, Direction};
use concord::net::relay::Relay;
use concord::node::{InitOptions, Node, NodeError};
use tokio::sync::oneshot;

use super::remote::ApiClient;

/// The server the demo tries for `hq` unless told otherwise.
pub const DEMO_POSTGRES_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long the demo waits for PostgreSQL to answer before it uses SQLite instead.
const POSTGRES_CONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long the demo waits for anything that should take well under a second.
const WAIT_MAX: Duration = Duration::from_secs(60);
/// How often the demo looks at the tables while it waits for them to agree.
const WAIT_POLL: Duration = Duration::from_millis(10);

const POSTGRES_TABLE: &str = "CREATE TABLE customers (
    id integer PRIMARY KEY,
    name text NOT NULL,
    email text,
    city text,
    credit numeric(12,2),
    active boolean NOT NULL DEFAULT true
)";
/// SQLite would turn a NUMERIC column's decimals into floats: exact amounts are kept as TEXT.
const SQLITE_TABLE: &str = "CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT,
    city TEXT,
    credit TEXT,
    active BOOLEAN NOT NULL DEFAULT 1
)";
const COLUMNS: [&str; 6] = ["id", "name", "email", "city", "credit", "active"];

/// What the demo asked for on the command line.
pub struct Options {
    pub dir: Option<PathBuf>,
    /// PostgreSQL server for `hq`; `None` uses SQLite at both sites.
    pub postgres: Option<String>,
}

/// One site's database, as the demo (standing in for the site's application) uses it.
enum Database {
    Postgres {
        client: Box<postgres::Client>,
        admin_url: String,
        url: String,
        name: String,
    },
    Sqlite {
        connection: rusqlite::Connection,
        path: PathBuf,
    },
}

type Rows = Vec<Vec<Option<String>>>;

impl Database {
    /// A fresh database on the server at `admin_url`.
    fn postgres(admin_url: &str) -> Result<Self> {
        let mut config: postgres::Config = admin_url.parse().context("bad PostgreSQL URL")?;
        config.connect_timeout(POSTGRES_CONNECT_WAIT);
        let mut admin = config.connect(postgres::NoTls)?;
        let name = format!("concord_demo_{}", std::process::id());
        // Two statements: PostgreSQL runs a multi-statement batch as one transaction, which
        // these may not be part of.
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        admin.batch_execute(&format!("CREATE DATABASE {name}"))?;
        config.dbname(&name);
        let client = Box::new(config.connect(postgres::NoTls)?);
        Ok(Self::Postgres {
            client,
            admin_url: admin_url.to_owned(),
            url: with_database(admin_url, &name)?,
            name,
        })
    }

    fn sqlite(path: &Path) -> Result<Self> {
        let connection = rusqlite::Connection::open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        connection.busy_timeout(Duration::from_secs(5))?;
        Ok(Self::Sqlite {
            connection,
            path: path.to_owned(),
        })
    }

    fn describe(&self) -> String {
        match self {
            Self::Postgres { name, .. } => format!("PostgreSQL database {name}"),
            Self::Sqlite { path, .. } => format!("SQLite file {}", path.display()),
        }
    }

    fn binding(&self) -> BindingSection {
        let (adapter, url) = match self {
            Self::Postgres { url, .. } => (AdapterKind::Postgres, url.clone()),
            Self::Sqlite { path, .. } => (AdapterKind::Sqlite, path.display().to_string()),
        };
        BindingSection {
            name: None,
            collection: "customers".to_owned(),
            adapter,
            url,
            table: "customers".to_owned(),
            key: vec!["id".to_owned()],
            direction: Direction::Both,
            fields: Default::default(),
        }
    }

    fn create_table(&mut self) -> Result<()> {
        match self {
            Self::Postgres { .. } => self.execute(POSTGRES_TABLE),
            Self::Sqlite { .. } => self.execute(SQLITE_TABLE),
        }
    }

    fn execute(&mut self, sql: &str) -> Result<()> {
        match self {
            Self::Postgres { client, .. } => client.batch_execute(sql)?,
            Self::Sqlite { connection, .. } => connection.execute_batch(sql)?,
        }
        Ok(())
    }

    /// The whole table in text form, ordered by id, booleans as `true`/`false`.
    fn rows(&mut self) -> Result<Rows> {
        match self {
            Self::Postgres { client, .. } => Ok(client
                .query(
                    "SELECT id::text, name, email, city, credit::text, active::text \
                     FROM customers ORDER BY id",
                    &[],
                )?
                .iter()
                .map(|row| (0..COLUMNS.len()).map(|index| row.get(index)).collect())
                .collect()),
            Self::Sqlite { connection, .. } => {
                let mut statement = connection.prepare(
                    "SELECT CAST(id AS TEXT), name, email, city, credit, \
                     CASE WHEN active IS NULL THEN NULL WHEN active THEN 'true' ELSE 'false' END \
                     FROM customers ORDER BY id",
                )?;
                let rows = statement
                    .query_map([], |row| {
                        (0..COLUMNS.len())
                            .map(|index| row.get::<_, Option<String>>(index))
                            .collect::<rusqlite::Result<Vec<_>>>()
                    })?
                    .collect::<rusqlite::Result<Rows>>()?;
                Ok(rows)
            }
        }
    }

    /// Drops the demo's PostgreSQL database (SQLite files go with the demo's folder).
    fn remove(self) -> Result<()> {
        if let Self::Postgres {
            client,
            admin_url,
            name,
            ..
        } = self
        {
            drop(client);
            let mut config: postgres::Config = admin_url.parse()?;
            config.connect_timeout(POSTGRES_CONNECT_WAIT);
            config
                .connect(postgres::NoTls)?
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        }
        Ok(())
    }
}

/// `url` with its database name replaced by `name` (query parameters are not kept).
fn with_database(url: &str, name: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .context("a PostgreSQL URL starts with postgres://")?;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    Ok(format!("{scheme}://{authority}/{name}"))
}

struct Site {
    name: &'static str,
    database: Database,
    api: ApiClient,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), NodeError>>>,
}

impl Site {
    fn sql(&mut self, sql: &str, out: &mut dyn Write) -> Result<()> {
        writeln!(out, "  {:<5} > {sql}", self.name)?;
        self.database
            .execute(sql)
            .with_context(|| format!("{}: {sql}", self.name))
    }

    fn peers(&self) -> Option<usize> {
        let status = self.api.status().ok()?;
        status["peers"].as_array().map(Vec::len)
    }

    fn binding_counter(&self, counter: &str) -> u64 {
        self.api
            .status()
            .ok()
            .and_then(|status| status["bindings"][0][counter].as_u64())
            .unwrap_or(0)
    }
}

pub fn run(options: Options, out: &mut dyn Write) -> Result<()> {
    let temporary = match options.dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("concord-demo-").tempdir()?),
    };
    let root = match (&options.dir, &temporary) {
        (Some(dir), _) => dir.clone(),
        (None, Some(temporary)) => temporary.path().to_owned(),
        (None, None) => unreachable!("a temporary folder exists when no dir was given"),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // The nodes run on this runtime; the demo itself, like a site's application, talks to
    // its databases from this thread with blocking clients.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    writeln!(
        out,
        "# Concord demo: two sites, one table, edits made offline; then an edge office"
    )?;
    let hq_database = match &options.postgres {
        Some(url) => match Database::postgres(url) {
            Ok(database) => database,
            Err(error) => {
                writeln!(
                    out,
                    "(PostgreSQL is not reachable at {url}: {error:#}; hq uses SQLite instead)"
                )?;
                Database::sqlite(&root.join("hq.db"))?
            }
        },
        None => Database::sqlite(&root.join("hq.db"))?,
    };
    let depot_database = Database::sqlite(&root.join("depot.db"))?;
    let result = demo(&runtime, &root, hq_database, depot_database, out);
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

fn demo(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    hq_database: Database,
    depot_database: Database,
    out: &mut dyn Write,
) -> Result<()> {
    let ca = root.join("ca");
    concord::net::tls::create_ca(&ca)?;
    let hq_listen = SocketAddr::from(([127, 0, 0, 1], concord::net::free_loopback_port()?));
    // depot dials hq through the relay; cutting the relay takes depot offline.
    let relay = runtime.block_on(Relay::start(hq_listen))?;
    let mut sites = Vec::new();
    for (name, listen, peers, mut database) in [
        ("hq", hq_listen, vec![], hq_database),
        (
            "depot",
            SocketAddr::from(([127, 0, 0, 1], concord::net::free_loopback_port()?)),
            vec![relay.address.to_string()],
            depot_database,
        ),
    ] {
        database.create_table()?;
        let api = format!("127.0.0.1:{}", concord::net::free_loopback_port()?);
        let dir = root.join(name);
        Node::init_with(
            &dir,
            &InitOptions {
                name: Some(name.to_owned()),
                ca: Some(ca.clone()),
                listen: Some(listen.to_string()),
                api: Some(api.clone()),
                peers,
                engine: None,
            },
        )?;
        let config_path = dir.join("concord.toml");
        let mut config = Config::load(&config_path)?;
        config.bindings.push(database.binding());
        std::fs::write(&config_path, config.to_toml())?;
        writeln!(
            out,
            "{name:<5} node in {}, table customers in {}",
            dir.display(),
            database.describe()
        )?;
        sites.push(Site {
            name,
            database,
            api: ApiClient::new(&api),
            stop: None,
            task: None,
        });
    }
    let outcome = script(runtime, root, &relay, &mut sites, out)
        .and_then(|()| edge_office(runtime, root, &ca, hq_listen, &mut sites, out));
    for site in &mut sites {
        if let Some(stop) = site.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = site.task.take() {
            runtime.block_on(task)??;
        }
    }
    for site in sites {
        site.database.remove()?;
    }
    outcome?;
    writeln!(out, "\nstopped every site cleanly")?;
    Ok(())
}

fn script(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    relay: &Relay,
    sites: &mut [Site],
    out: &mut dyn Write,
) -> Result<()> {
    writeln!(
        out,
        "\n## hq's table already has customers; depot's is empty"
    )?;
    sites[0].sql(
        "INSERT INTO customers (id, name, email, city, credit) VALUES \
         (1, 'Ada Lovelace', 'ada@example.com', 'London', '1500.00'), \
         (2, 'Grace Hopper', 'grace@example.com', 'Arlington', '820.50'), \
         (3, 'Alan Turing', 'alan@example.com', 'Wilmslow', '0.00')",
        out,
    )?;

    writeln!(out, "\n## Start both nodes, each bound to its table")?;
    let started = Instant::now();
    for site in sites.iter_mut() {
        let node = Arc::new(Node::open(&root.join(site.name))?);
        let (stop, stopped) = oneshot::channel::<()>();
        site.task = Some(runtime.spawn(concord::node::runtime::run(node, async {
            let _ = stopped.await;
        })));
        site.stop = Some(stop);
    }
    wait("the sites to connect", || {
        Ok(sites.iter().all(|site| site.peers() == Some(1)))
    })?;
    wait_same(sites)?;
    writeln!(
        out,
        "  hq imported its 3 rows and depot's table was filled from the records, {:.0} ms after start",
        started.elapsed().as_secs_f64() * 1000.0
    )?;
    show_table(sites[1].name, &sites[1].database.rows()?, out)?;

    writeln!(out, "\n## depot goes offline; both sites keep editing")?;
    relay.set_cut(true);
    wait("depot to go offline", || {
        Ok(sites.iter().all(|site| site.peers() == Some(0)))
    })?;
    let (hq, depot) = sites.split_at_mut(1);
    let (hq, depot) = (&mut hq[0], &mut depot[0]);
    hq.sql(
        "UPDATE customers SET email = 'ada@analytical.org' WHERE id = 1",
        out,
    )?;
    depot.sql("UPDATE customers SET credit = '2750.00' WHERE id = 1", out)?;
    hq.sql("UPDATE customers SET city = 'Washington' WHERE id = 2", out)?;
    depot.sql("UPDATE customers SET city = 'New York' WHERE id = 2", out)?;
    depot.sql("DELETE FROM customers WHERE id = 3", out)?;
    hq.sql(
        "INSERT INTO customers (id, name, email, city, credit) \
         VALUES (4, 'Katherine Johnson', 'katherine@example.com', 'Hampton', '310.00')",
        out,
    )?;
    depot.sql(
        "INSERT INTO customers (id, name, city, credit, active) \
         VALUES (5, 'Edsger Dijkstra', 'Nuenen', '99.90', false)",
        out,
    )?;
    // Long enough for each binding to capture its own site's edits (tens of milliseconds).
    std::thread::sleep(Duration::from_millis(300));
    show_table(hq.name, &hq.database.rows()?, out)?;
    show_table(depot.name, &depot.database.rows()?, out)?;

    writeln!(out, "\n## depot comes back online")?;
    let captured_before = [
        hq.binding_counter("rows_captured"),
        depot.binding_counter("rows_captured"),
    ];
    relay.set_cut(false);
    let took = wait_same(sites)?;
    writeln!(
        out,
        "  both tables agree {:.0} ms after the link came back (reconnect included)",
        took.as_secs_f64() * 1000.0
    )?;
    let hq_rows = sites[0].database.rows()?;
    show_table("hq and depot", &hq_rows, out)?;
    writeln!(
        out,
        "  customer 1 kept both edits: the email from hq, the credit from depot\n  \
         customer 2's city was edited at both sites: both tables hold the same one\n  \
         customer 3, deleted at depot, is gone at both; 4 and 5 are at both"
    )?;
    // Let the bindings settle, then show that applying the merge captured nothing back.
    std::thread::sleep(Duration::from_millis(300));
    for (site, before) in sites.iter().zip(captured_before) {
        writeln!(
            out,
            "  {:<5} binding: {} rows captured in all, {} rows written to its table, {} captured since the link came back",
            site.name,
            site.binding_counter("rows_captured"),
            site.binding_counter("rows_applied"),
            site.binding_counter("rows_captured") - before
        )?;
    }
    Ok(())
}

/// The customers the edge office `paris` may read and write.
const EDGE_SCOPE: &str = "customers:city=Paris";

/// A third site, `paris`, granted only [`EDGE_SCOPE`]: its table receives Paris's customers
/// and no other, a customer moved to Paris arrives there and one moved away leaves it, and a
/// row it writes outside its grant stays in its quarantine.
fn edge_office(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    ca: &Path,
    hq_listen: SocketAddr,
    sites: &mut Vec<Site>,
    out: &mut dyn Write,
) -> Result<()> {
    writeln!(
        out,
        "\n## An edge office, paris, that may read and write only {EDGE_SCOPE}"
    )?;
    sites[0].sql("UPDATE customers SET city = 'Paris' WHERE id = 4", out)?;
    let mut database = Database::sqlite(&root.join("paris.db"))?;
    database.create_table()?;
    let api = format!("127.0.0.1:{}", concord::net::free_loopback_port()?);
    let dir = root.join("paris");
    let id = Node::init_with(
        &dir,
        &InitOptions {
            name: Some("paris".to_owned()),
            ca: Some(ca.to_owned()),
            listen: Some(
                SocketAddr::from(([127, 0, 0, 1], concord::net::free_loopback_port()?)).to_string(),
            ),
            api: Some(api.clone()),
            peers: vec![hq_listen.to_string()],
            engine: None,
        },
    )?;
    let config_path = dir.join("concord.toml");
    let mut config = Config::load(&config_path)?;
    config.bindings.push(database.binding());
    std::fs::write(&config_path, config.to_toml())?;
    // The grant, signed with the cluster CA key, goes to hq (running: through its API) before
    // paris first connects, so paris is never sent what it may not read.
    let hq_dir = root.join(sites[0].name).display().to_string();
    let (id_text, ca_text) = (id.to_string(), ca.display().to_string());
    let grant = [
        "grant", &id_text, "--ca", &ca_text, "--read", EDGE_SCOPE, "--write", EDGE_SCOPE,
    ];
    writeln!(out, "  $ concord --data {hq_dir} {}", grant.join(" "))?;
    let mut args = vec!["concord", "--data", &hq_dir];
    args.extend(grant);
    let cli = super::Cli::try_parse_from(&args).context("the grant command does not parse")?;
    let mut answer = Vec::new();
    super::execute(cli, &mut answer)?;
    write!(out, "  {}", String::from_utf8_lossy(&answer))?;

    let node = Arc::new(Node::open(&dir)?);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = runtime.spawn(concord::node::runtime::run(node, async {
        let _ = stopped.await;
    }));
    sites.push(Site {
        name: "paris",
        database,
        api: ApiClient::new(&api),
        stop: Some(stop),
        task: Some(task),
    });
    let started = Instant::now();
    wait("paris's table to hold Paris's customer", || {
        Ok(ids_at(&mut sites[2])? == ["4"])
    })?;
    writeln!(
        out,
        "  paris started and received only customer 4, the one in Paris, {:.0} ms after start",
        started.elapsed().as_secs_f64() * 1000.0
    )?;
    show_table("paris", &sites[2].database.rows()?, out)?;

    customers_move(sites, out)?;
    edge_writes(sites, out)
}

/// The keys of the rows in a site's table.
fn ids_at(site: &mut Site) -> Result<Vec<String>> {
    Ok(site
        .database
        .rows()?
        .into_iter()
        .filter_map(|row| row.first().cloned().flatten())
        .collect())
}

/// Customers move in and out of paris's scope at hq; paris's table follows.
fn customers_move(sites: &mut [Site], out: &mut dyn Write) -> Result<()> {
    writeln!(out, "\n## Customers move in and out of Paris at hq")?;
    sites[0].sql("UPDATE customers SET city = 'Paris' WHERE id = 1", out)?;
    let moved = Instant::now();
    wait("customer 1 to arrive at paris", || {
        Ok(ids_at(&mut sites[2])?.contains(&"1".to_owned()))
    })?;
    writeln!(
        out,
        "  customer 1 arrived whole at paris {:.0} ms later",
        moved.elapsed().as_secs_f64() * 1000.0
    )?;
    sites[0].sql("UPDATE customers SET city = 'Lyon' WHERE id = 4", out)?;
    let moved = Instant::now();
    wait("customer 4 to leave paris", || {
        Ok(ids_at(&mut sites[2])? == ["1"])
    })?;
    writeln!(
        out,
        "  customer 4 left paris's table and store {:.0} ms later (the change that moved it \
         took it out of paris's scope; hq, which reads everything, confirmed paris held \
         nothing of it that hq lacks)",
        moved.elapsed().as_secs_f64() * 1000.0
    )?;
    show_table("paris", &sites[2].database.rows()?, out)?;

    Ok(())
}

/// paris writes inside its grant (it reaches hq and depot) and outside (it is quarantined).
fn edge_writes(sites: &mut [Site], out: &mut dyn Write) -> Result<()> {
    writeln!(out, "\n## paris writes inside and outside its grant")?;
    let quarantined_before = sites[2].binding_counter("quarantined");
    sites[2].sql(
        "INSERT INTO customers (id, name, email, city, credit) \
         VALUES (6, 'Marie Curie', 'marie@example.com', 'Paris', '640.00')",
        out,
    )?;
    sites[2].sql(
        "INSERT INTO customers (id, name, city, credit) \
         VALUES (7, 'Hokusai', 'Tokyo', '12.00')",
        out,
    )?;
    wait("customer 6 to reach hq and depot", || {
        let at = |site: &mut Site| -> Result<bool> { Ok(ids_at(site)?.contains(&"6".to_owned())) };
        Ok(at(&mut sites[0])? && at(&mut sites[1])?)
    })?;
    wait("paris to set customer 7 aside", || {
        Ok(sites[2].binding_counter("quarantined") > quarantined_before)
    })?;
    let errors = sites[2].api.errors()?;
    let reason = errors["errors"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["key"] == "7"))
        .map_or_else(String::new, |row| {
            row["error"].as_str().unwrap_or_default().to_owned()
        });
    writeln!(
        out,
        "  customer 6 reached hq and depot; customer 7 stays in paris's quarantine: {reason}"
    )?;
    for site in sites.iter_mut().take(2) {
        if ids_at(site)?.contains(&"7".to_owned()) {
            bail!(
                "{} holds customer 7, written outside paris's grant",
                site.name
            );
        }
    }
    let (central, edge) = sites.split_at_mut(2);
    show_table("hq and depot", &central[0].database.rows()?, out)?;
    show_table("paris", &edge[0].database.rows()?, out)?;
    if central[0].database.rows()? != central[1].database.rows()? {
        bail!("hq and depot disagree");
    }
    Ok(())
}

/// Polls `done` until it holds, for at most [`WAIT_MAX`].
fn wait(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > WAIT_MAX {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(WAIT_POLL);
    }
    Ok(())
}

/// Waits until both sites' tables hold the same rows; returns how long that took.
fn wait_same(sites: &mut [Site]) -> Result<Duration> {
    let start = Instant::now();
    let (first, rest) = sites.split_at_mut(1);
    wait("the tables to agree", || {
        Ok(first[0].database.rows()? == rest[0].database.rows()?)
    })?;
    Ok(start.elapsed())
}

fn show_table(title: &str, rows: &Rows, out: &mut dyn Write) -> Result<()> {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|cell| cell.clone().unwrap_or_else(|| "NULL".to_owned()))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|index| {
            cells
                .iter()
                .map(|row| row[index].chars().count())
                .chain([COLUMNS[index].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| {
        values
            .iter()
            .zip(&widths)
            .map(|(value, width)| format!("{value:<width$}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    writeln!(out, "  {title}:")?;
    writeln!(out, "    {}", line(COLUMNS.to_vec()))?;
    for row in &cells {
        writeln!(
            out,
            "    {}",
            line(row.iter().map(String::as_str).collect())
        )?;
    }
    Ok(())
}
