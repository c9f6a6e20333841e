//! The `concord` command line.
//!
//! A contract that the README and the tests rely on. Exit codes: 0 on success, 1 for a usage
//! or data error (one line on stderr), 2 when the record asked for is not found. Logs go to
//! stderr through `tracing`, filtered by `RUST_LOG` (default `warn`).

mod cluster_demo;
mod demo;
mod remote;
mod table_demo;

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use concord::node::{Node, NodeError};
use concord::record::{Collection, Key, RecordId, RecordWrite};
use serde_json::{Map, Value as Json};

/// Records written per flush by `load`.
pub const LOAD_BATCH_RECORDS_DEFAULT: usize = 1000;
/// Most records `load` may write per flush.
pub const LOAD_BATCH_RECORDS_MAX: usize = 100_000;
/// Longest line `load` accepts, in bytes: what the API takes in one request, so a line loads
/// alike into a stopped node and through a running one.
pub const LOAD_LINE_BYTES_MAX: usize = concord::node::api::REQUEST_BYTES_MAX;
/// Records `list` reads from the store per page.
const LIST_PAGE_RECORDS: usize = 256;

#[derive(Parser, Debug)]
#[command(
    name = "concord",
    version,
    about = "Masterless replication of business records"
)]
pub struct Cli {
    /// The node's data dir (made by `concord init`).
    #[arg(long, global = true, env = "CONCORD_DATA", value_name = "DIR")]
    data: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a node's data dir: config, identity and an empty store.
    Init {
        dir: PathBuf,
        /// A readable name for the node (default: node-<id prefix>).
        #[arg(long)]
        name: Option<String>,
        /// A cluster CA dir (from `concord ca init`): issue this node's certificate from it.
        #[arg(long, value_name = "CA_DIR")]
        ca: Option<PathBuf>,
        /// QUIC address for peers (default 127.0.0.1:7400).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// HTTP API address (default 127.0.0.1:7480).
        #[arg(long, value_name = "HOST:PORT")]
        api: Option<String>,
        /// A peer to dial; repeat for several.
        #[arg(long = "peer", value_name = "HOST:PORT")]
        peers: Vec<String>,
        /// The store's engine (default: the one the README names for new nodes).
        #[arg(long, value_name = "ENGINE")]
        engine: Option<concord::store::Engine>,
    },
    /// Manage the cluster CA.
    Ca {
        #[command(subcommand)]
        action: CaCommand,
    },
    /// Run the node: replicate with its peers over QUIC and serve the HTTP API.
    Run,
    /// Show a running node's status: peers, replication lag, records, bindings.
    Status,
    /// List rows the adapters quarantined, one JSON object per line: binding, direction,
    /// key, error, attempts, next retry.
    Errors,
    /// Grant a node read and write access, signed with the cluster CA key: it replicates,
    /// and replaces the node's earlier grant. A scope is COLLECTION or COLLECTION:FIELD=VALUE
    /// (the records whose field has that value; VALUE is everything after the first `=`,
    /// commas included). Every node sends the granted node only what it may read, and takes
    /// from it, or from anyone relaying its changes, only what it may write.
    Grant {
        /// The node's name or id.
        node: String,
        /// The cluster CA dir (its key signs the grant).
        #[arg(long, value_name = "CA_DIR")]
        ca: PathBuf,
        /// A scope it may read; repeat the flag for more.
        #[arg(long, value_name = "SCOPE")]
        read: Vec<String>,
        /// A scope it may write; repeat the flag for more.
        #[arg(long, value_name = "SCOPE")]
        write: Vec<String>,
    },
    /// List the grants in force, one JSON object per line: node, read, write, issued, signer.
    Grants,
    /// Revoke a node: every node closes and refuses its connections and takes none of its
    /// changes past a cut-off, per writer of the node, at how far this node holds its log now
    /// (its changes up to there stay). Signed with the cluster CA key; it replicates.
    Revoke {
        /// The node's name or id.
        node: String,
        /// The cluster CA dir (its key signs the revocation).
        #[arg(long, value_name = "CA_DIR")]
        ca: PathBuf,
    },
    /// Manage the cluster's nodes.
    Node {
        #[command(subcommand)]
        action: NodeCommand,
    },
    /// Have a binding load again as when it first started: records into its table, rows
    /// into records. For a table dropped and made again under the binding; rows that match
    /// their record are left as they are.
    Refill {
        /// The binding's name (`concord status` lists them).
        binding: String,
    },
    /// List changes this node refused, one JSON object per line: record, change, actor,
    /// sequence, author, reason (`duplicate_sequence`: another change with the same actor and
    /// sequence stands; `depends_on_refused`; `outside_grant`: its author's grant does not
    /// allow it; `revoked`: its author was revoked and it is past the cut-off), the change
    /// that stands instead, its clock.
    Refused {
        /// Most changes listed.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// List changes with the node, source and time that wrote them, one JSON object per
    /// line, earliest first (by the writers' clocks); every filter given must hold.
    Audit {
        /// Only this collection (Concord's own, such as `_actors`, only when named).
        #[arg(long)]
        collection: Option<String>,
        /// Only this record (COLLECTION/KEY).
        #[arg(long)]
        record: Option<String>,
        /// Only this source: `api`, or a binding's name.
        #[arg(long)]
        source: Option<String>,
        /// Only this node (name or id).
        #[arg(long)]
        node: Option<String>,
        /// From this time on (RFC 3339, such as 2026-11-26T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Up to this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Most changes listed.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// List conflicting fields, one JSON object per line: record, field, candidates (value,
    /// node, source, site, time), the winner's index and the rule that picked it.
    Conflicts {
        /// Only this collection.
        collection: Option<String>,
        /// Most records listed.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Settle a conflicting field with a new write that replicates: the candidate at
    /// `--pick N` (as `concord conflicts` numbers them), or `--value JSON`.
    Resolve {
        id: String,
        field: String,
        #[arg(long, conflicts_with = "value", required_unless_present = "value")]
        pick: Option<usize>,
        #[arg(long)]
        value: Option<String>,
    },
    /// Set fields of a record (FIELD=VALUE; VALUE is JSON if it parses, else a string;
    /// FIELD= removes the field).
    Put {
        id: String,
        #[arg(value_name = "FIELD=VALUE", required_unless_present = "value_files")]
        fields: Vec<String>,
        /// Set FIELD to the contents of the file at PATH (JSON if it parses, else a string),
        /// for values too long for the command line; repeat for several.
        #[arg(long = "value-file", value_name = "FIELD=PATH")]
        value_files: Vec<String>,
        /// Replace the record: remove every field not given.
        #[arg(long)]
        replace: bool,
    },
    /// Print a record as one JSON object (exit code 2 if not found).
    Get {
        id: String,
        /// Print the record as it was at this version (a hash from `concord history`).
        #[arg(long, value_name = "VERSION")]
        at: Option<String>,
    },
    /// Write a new change that makes a record what it was at a version (a hash from
    /// `concord history`); it replicates like any edit and can itself be reverted.
    Revert {
        id: String,
        #[arg(long, value_name = "VERSION")]
        to: String,
    },
    /// Delete a record (exit code 2 if not found).
    Delete { id: String },
    /// Print a collection's records, one JSON object per line: {"key": ..., "fields": ...}.
    List { collection: String },
    /// Print a record's changes, one JSON object per line: actor, origin, time, effect.
    History {
        id: String,
        /// Only the changes after this one (a hash from an earlier page, or 8+ of its hex
        /// digits).
        #[arg(long, value_name = "VERSION")]
        after: Option<String>,
        /// Most changes listed (default: all, up to 100,000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Write a record's Automerge document (saved bytes) to FILE, or to stdout when FILE is
    /// "-" or not given.
    Export {
        id: String,
        /// Where to write it ("-": stdout).
        #[arg(value_name = "FILE", conflicts_with = "output")]
        file: Option<PathBuf>,
        /// The same as FILE.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Merge a saved Automerge document (FILE, "-" for stdin) into a record. The document
    /// passes the rules of a write, and its changes the clock bound, or nothing is stored.
    Import { id: String, file: PathBuf },
    /// Copy a node's store, with its node.id and config, to FILE: through its API while the
    /// node runs (it goes on taking writes), directly while it is stopped. The file is checked
    /// once written; it holds the node's records, so it is readable by its owner only.
    Backup {
        /// The node's data dir (default: --data).
        dir: Option<PathBuf>,
        /// Where to write the backup.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Bring a backup back into DIR, as a new incarnation that catches up from its peers
    /// what was written since. DIR is the node's stopped data dir (its store is kept aside,
    /// with --replace), or a new dir made with --ca, which issues the node a new certificate.
    Restore {
        file: PathBuf,
        dir: PathBuf,
        /// The cluster CA dir, to restore onto a machine that lost the data dir.
        #[arg(long, value_name = "CA_DIR")]
        ca: Option<PathBuf>,
        /// Put the backup in place of DIR's store (which is kept as store.replaced-<time>).
        #[arg(long)]
        replace: bool,
        /// Make the store on this engine, and name it in DIR's config: how a
        /// node moves between engines (default: the engine DIR's config names, or the default
        /// for a new dir).
        #[arg(long, value_name = "ENGINE")]
        engine: Option<concord::store::Engine>,
    },
    /// Salvage what a damaged store still holds (the node stopped), and take the rest from
    /// peers once it runs: the damaged store is kept as store.damaged-<time>.
    Recover {
        /// The node's data dir (default: --data).
        dir: Option<PathBuf>,
    },
    /// (Internal: the copy `recover` runs in a child process, one key space at a time.)
    #[command(name = "__salvage-copy", hide = true)]
    SalvageCopy {
        from: PathBuf,
        to: PathBuf,
        space: char,
    },
    /// Write many records from JSON lines (one object per line), durably, in batches.
    Load {
        collection: String,
        /// The file to read ("-" or nothing for stdin).
        file: Option<PathBuf>,
        /// The field of each object that holds the record key.
        #[arg(long, default_value = "id")]
        key_field: String,
        /// Records per batch; a batch is acknowledged by one flush.
        #[arg(long, default_value_t = LOAD_BATCH_RECORDS_DEFAULT)]
        batch: usize,
        /// Print `COLLECTION/KEY` for every record once it is durable.
        #[arg(long)]
        ack: bool,
        /// Report each bad line (with its number) and load the rest; without it the load
        /// stops at the first bad line, with every line before it loaded.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Two sites keep one table in step (hq on PostgreSQL where a server answers, else
    /// SQLite; depot on SQLite), edited at both while depot is offline. `--partition`: three
    /// sites, writes through the API, a partition and healing. `--cli`: a scripted CLI
    /// session on one embedded node.
    Demo {
        /// Where to put the demo's data dirs (default: a fresh temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Run the scripted CLI session on one embedded node.
        #[arg(long, conflicts_with = "partition")]
        cli: bool,
        /// Run the three-site partition demo.
        #[arg(long)]
        partition: bool,
        /// PostgreSQL server for hq's table (a database is made for the demo and dropped).
        #[arg(long, default_value = table_demo::DEMO_POSTGRES_DEFAULT)]
        postgres: String,
        /// Use SQLite at both sites, even where PostgreSQL answers.
        #[arg(long)]
        sqlite_only: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create a cluster CA (certificate, key, cluster id) in CA_DIR.
    Init {
        #[arg(value_name = "CA_DIR")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Remove a node that will never return: it no longer holds back the log entries and
    /// history every other node holds (they are reclaimed), its changes all still count, and
    /// every node refuses its connections from then on. Signed with the cluster CA key; it
    /// replicates. A site that returns needs a new node.
    Remove {
        /// The node's name or id.
        node: String,
        /// The cluster CA dir (its key signs the removal).
        #[arg(long, value_name = "CA_DIR")]
        ca: PathBuf,
    },
}

/// Where record commands go: the data dir itself, or the node serving it.
enum Target {
    Local(Box<Node>),
    Remote(remote::ApiClient),
}

/// Finds the node named `node` where `target` says, and stores there what `sign` signs for it
/// (a grant, a removal); returns the node's id.
fn add_signed_for(
    target: Target,
    node: &str,
    sign: impl FnOnce(concord::record::NodeId) -> Result<concord::scope::Signed>,
) -> Result<concord::record::NodeId> {
    match target {
        Target::Local(local) => {
            let id = local.node_named(node)?;
            local.add_signed(&sign(id)?.to_bytes())?;
            Ok(id)
        }
        Target::Remote(api) => {
            let id: concord::record::NodeId = api.node_named(node)?["node"]
                .as_str()
                .unwrap_or_default()
                .parse()
                .context("the node answered with no node id")?;
            api.add_signed(&sign(id)?.to_bytes())?;
            Ok(id)
        }
    }
}

fn target(data: Option<PathBuf>) -> Result<Target> {
    let dir = data_dir(data)?;
    // A running node holds its store's lock: through its API at once, without waiting. A
    // lock held with nothing at the API's address is a store just closed (its threads let go
    // a moment later): opened below, which waits for the lock.
    if concord::node::store_in_use(&dir)? {
        let api = remote::ApiClient::for_data_dir(&dir)?;
        if api.answers() {
            return Ok(Target::Remote(api));
        }
    }
    match Node::open(&dir) {
        Ok(node) => Ok(Target::Local(Box::new(node))),
        Err(NodeError::Locked { .. }) => Ok(Target::Remote(remote::ApiClient::for_data_dir(&dir)?)),
        Err(error) => Err(error.into()),
    }
}

/// Parses `args`, runs the command, and turns the outcome into the exit code.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    init_logging();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let mut stdout = std::io::stdout().lock();
    match execute(cli, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let not_found = matches!(
                error.downcast_ref::<NodeError>(),
                Some(NodeError::NotFound(_))
            );
            eprintln!("error: {}", error_text(&error));
            if not_found {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second call (the demo runs commands in-process) finds a subscriber already set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn data_dir(cli_data: Option<PathBuf>) -> Result<PathBuf> {
    cli_data.context("no data dir: pass --data DIR or set CONCORD_DATA")
}

fn open(data: Option<PathBuf>) -> Result<Node> {
    let dir = data_dir(data)?;
    Ok(Node::open(&dir)?)
}

/// Runs one parsed command, writing its output to `out`.
pub fn execute(cli: Cli, out: &mut dyn Write) -> Result<()> {
    match cli.command {
        Command::Init {
            dir,
            name,
            ca,
            listen,
            api,
            peers,
            engine,
        } => {
            let options = concord::node::InitOptions {
                name,
                ca,
                listen,
                api,
                peers,
                engine,
            };
            let id = Node::init_with(&dir, &options)?;
            writeln!(out, "initialized node {id} in {}", dir.display())?;
        }
        Command::Ca {
            action: CaCommand::Init { dir },
        } => {
            let cluster = concord::net::tls::create_ca(&dir)?;
            writeln!(
                out,
                "created cluster CA {} in {}",
                hex::encode(cluster),
                dir.display()
            )?;
        }
        Command::Run => {
            let node = std::sync::Arc::new(open(cli.data)?);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let config = node.config().clone();
            let (id, name) = (node.id(), config.node.name.clone());
            runtime.block_on(async {
                let running = concord::node::runtime::start(node).await?;
                eprintln!(
                    "concord: node {name} ({id}) running: peers connect to {}, the API is at \
                     http://{}; Ctrl-C or SIGTERM stops it",
                    config.network.listen, config.network.api
                );
                running.run_until(shutdown_signal()).await
            })?;
            eprintln!("concord: node {name} stopped");
        }
        Command::Backup { dir, output } => {
            let dir = dir.map_or_else(|| data_dir(cli.data), Ok)?;
            backup(&dir, &output, out)?;
        }
        Command::Restore {
            file,
            dir,
            ca,
            replace,
            engine,
        } => {
            let progress = spinner("{spinner} restoring: {msg}");
            let options = concord::node::maintenance::RestoreOptions {
                ca: ca.as_deref(),
                replace,
                engine,
            };
            let report =
                concord::node::maintenance::restore(&file, &dir, &options, |what, count| {
                    progress.set_message(format!("{count} {what}"))
                })?;
            progress.finish_and_clear();
            writeln!(out, "{}", serde_json::to_string(&report)?)?;
        }
        Command::Recover { dir } => {
            let dir = dir.map_or_else(|| data_dir(cli.data), Ok)?;
            let exe =
                std::env::current_exe().context("cannot find this program to run the salvage")?;
            let command = vec![exe.into_os_string(), OsString::from("__salvage-copy")];
            let progress = spinner("{spinner} recovering: {msg}");
            let report = concord::node::maintenance::recover(&dir, &command, |what, count| {
                progress.set_message(format!("{count} {what}"))
            })?;
            progress.finish_and_clear();
            writeln!(out, "{}", serde_json::to_string(&report)?)?;
        }
        Command::SalvageCopy { from, to, space } => {
            let space = u8::try_from(space).context("a key space is one ASCII letter")?;
            concord::node::maintenance::salvage_copy(&from, &to, space, std::io::stdout())?;
        }
        Command::Status => {
            let dir = data_dir(cli.data)?;
            let status = remote::ApiClient::for_data_dir(&dir)?
                .status()
                .context("is the node running? (`concord run`)")?;
            print_status(&status, out)?;
        }
        Command::Audit {
            collection,
            record,
            source,
            node,
            since,
            until,
            limit,
        } => {
            let filter = concord::node::AuditFilter {
                collection: collection.as_deref().map(Collection::new).transpose()?,
                record: record.as_deref().map(RecordId::parse_user).transpose()?,
                source,
                node,
                since: since
                    .as_deref()
                    .map(concord::node::parse_time)
                    .transpose()?,
                until: until
                    .as_deref()
                    .map(concord::node::parse_time)
                    .transpose()?,
                limit,
            };
            let (entries, truncated) = match target(cli.data)? {
                Target::Local(node) => {
                    let report = node.audit(&filter)?;
                    let entries = report
                        .entries
                        .iter()
                        .map(serde_json::to_value)
                        .collect::<Result<Vec<_>, _>>()?;
                    (entries, report.truncated)
                }
                Target::Remote(api) => {
                    let report = api.audit(&filter)?;
                    (
                        report["entries"].as_array().cloned().unwrap_or_default(),
                        report["truncated"].as_bool().unwrap_or(false),
                    )
                }
            };
            for entry in entries {
                writeln!(out, "{entry}")?;
            }
            if truncated {
                eprintln!("(more changes matched: narrow the filter, or continue with --since)");
            }
        }
        Command::Conflicts { collection, limit } => {
            let collection = collection.as_deref().map(Collection::new).transpose()?;
            let report = match target(cli.data)? {
                Target::Local(node) => {
                    serde_json::to_value(node.conflicts(collection.as_ref(), limit)?)?
                }
                Target::Remote(api) => api.conflicts(collection.as_ref(), limit)?,
            };
            for record in report["records"].as_array().cloned().unwrap_or_default() {
                for field in record["fields"].as_array().cloned().unwrap_or_default() {
                    let mut line = field;
                    line["record"] = record["record"].clone();
                    writeln!(out, "{line}")?;
                }
            }
            if report["truncated"].as_bool().unwrap_or(false) {
                eprintln!("(more records conflict: name a collection, or raise --limit)");
            }
        }
        Command::Resolve {
            id,
            field,
            pick,
            value,
        } => {
            let id = RecordId::parse_user(&id)?;
            let settlement = match (pick, value) {
                (Some(index), _) => concord::node::Settlement::Pick(index),
                (None, Some(text)) => concord::node::Settlement::Value(
                    serde_json::from_str(&text).unwrap_or(Json::String(text)),
                ),
                (None, None) => bail!("give --pick N or --value JSON"),
            };
            let value = match target(cli.data)? {
                Target::Local(node) => node.resolve(&id, &field, &settlement)?,
                Target::Remote(api) => api.resolve(&id, &field, &settlement)?,
            };
            writeln!(out, "{id} {field} = {value}")?;
        }
        Command::Grant {
            node,
            ca,
            read,
            write,
        } => {
            let parse = |list: &[String]| -> Result<Vec<concord::scope::Scope>> {
                list.iter().map(|text| parse_scope(text)).collect()
            };
            let (read, write) = (parse(&read)?, parse(&write)?);
            let authority = concord::scope::Authority::open(&ca)?;
            let issued = u64::try_from(concord::node::now_ms()).unwrap_or(0);
            let id = add_signed_for(target(cli.data)?, &node, |id| {
                Ok(authority.grant(id, read, write, issued)?)
            })?;
            writeln!(out, "granted node {id}")?;
        }
        Command::Revoke { node, ca } => {
            let authority = concord::scope::Authority::open(&ca)?;
            let issued = u64::try_from(concord::node::now_ms()).unwrap_or(0);
            let (id, cut_off) = match target(cli.data)? {
                Target::Local(local) => {
                    let id = local.node_named(&node)?;
                    let cut_off = local.writers_of(id)?;
                    local.add_signed(&authority.revoke(id, cut_off.clone(), issued)?.to_bytes())?;
                    (id, cut_off)
                }
                Target::Remote(api) => {
                    let answer = api.node_named(&node)?;
                    let id: concord::record::NodeId = answer["node"]
                        .as_str()
                        .unwrap_or_default()
                        .parse()
                        .context("the node answered with no node id")?;
                    let mut cut_off = std::collections::BTreeMap::new();
                    for (writer, mark) in answer["writers"].as_object().into_iter().flatten() {
                        let writer: concord::record::NodeId = writer
                            .parse()
                            .context("the node answered with a bad writer id")?;
                        cut_off.insert(writer, mark.as_u64().unwrap_or(0));
                    }
                    api.add_signed(&authority.revoke(id, cut_off.clone(), issued)?.to_bytes())?;
                    (id, cut_off)
                }
            };
            let cut_off: Vec<String> = cut_off
                .iter()
                .map(|(writer, place)| format!("{writer}:{place}"))
                .collect();
            writeln!(
                out,
                "revoked node {id}; its changes count up to {}",
                if cut_off.is_empty() {
                    "none".to_owned()
                } else {
                    cut_off.join(", ")
                }
            )?;
        }
        Command::Node {
            action: NodeCommand::Remove { node, ca },
        } => {
            let authority = concord::scope::Authority::open(&ca)?;
            let issued = u64::try_from(concord::node::now_ms()).unwrap_or(0);
            let id = add_signed_for(target(cli.data)?, &node, |id| {
                Ok(authority.remove(id, issued)?)
            })?;
            writeln!(
                out,
                "removed node {id}: it holds nothing back from reclamation, and its \
                 connections are refused"
            )?;
        }
        Command::Grants => {
            let grants = match target(cli.data)? {
                Target::Local(local) => local.grants(),
                Target::Remote(api) => api.grants()?["grants"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            };
            for grant in grants {
                writeln!(out, "{grant}")?;
            }
        }
        Command::Refill { binding } => {
            match target(cli.data)? {
                Target::Local(node) => concord::adapters::driver::refill(&node, &binding)?,
                Target::Remote(api) => {
                    api.refill(&binding)?;
                }
            }
            writeln!(out, "binding {binding} loads again")?;
        }
        Command::Errors => {
            let dir = data_dir(cli.data)?;
            let answer = remote::ApiClient::for_data_dir(&dir)?
                .errors()
                .context("is the node running? (`concord run`)")?;
            for row in answer["errors"].as_array().cloned().unwrap_or_default() {
                writeln!(out, "{row}")?;
            }
        }
        Command::Refused { limit } => {
            let rows = match target(cli.data)? {
                Target::Local(node) => node.refused_changes(limit)?,
                Target::Remote(client) => {
                    let answer = client.refused()?;
                    let rows = answer["refused"].as_array().cloned().unwrap_or_default();
                    rows.into_iter().take(limit).collect()
                }
            };
            for row in rows {
                writeln!(out, "{row}")?;
            }
        }
        Command::Put {
            id,
            fields,
            value_files,
            replace,
        } => {
            let id = RecordId::parse_user(&id)?;
            let mut assignments = fields;
            for value_file in &value_files {
                assignments.push(read_value_file(value_file)?);
            }
            let mut write = parse_assignments(&assignments)?;
            write.replace = replace;
            // As PATCH does: an object merges into the one the field holds.
            write.merge = !replace;
            match target(cli.data)? {
                Target::Local(node) => {
                    node.put(&id, &write)?;
                }
                Target::Remote(api) => api.put(&id, &write)?,
            }
        }
        Command::Get { id, at } => {
            // Concord's own collections (`_actors`, `_grants`) read as `list` and `history`
            // read them; only writing them is reserved.
            let id = RecordId::parse(&id)?;
            let fields = match (target(cli.data)?, at) {
                (Target::Local(node), None) => {
                    Json::Object(node.get(&id)?.ok_or(NodeError::NotFound(id))?)
                }
                (Target::Local(node), Some(version)) => {
                    let version = node.resolve_version(&id, &version)?;
                    Json::Object(node.get_at(&id, &version)?.ok_or(NodeError::NotFound(id))?)
                }
                (Target::Remote(api), None) => api.get(&id)?,
                (Target::Remote(api), Some(version)) => api.get_at(&id, &version)?,
            };
            writeln!(out, "{fields}")?;
        }
        Command::Revert { id, to } => {
            let id = RecordId::parse_user(&id)?;
            let changed = match target(cli.data)? {
                Target::Local(node) => {
                    let version = node.resolve_version(&id, &to)?;
                    node.revert(&id, &version)?
                }
                Target::Remote(api) => api.revert(&id, &to)?,
            };
            if !changed {
                writeln!(out, "{id} is already as it was at {to}")?;
            }
        }
        Command::Delete { id } => {
            let id = RecordId::parse_user(&id)?;
            match target(cli.data)? {
                Target::Local(node) => node.delete(&id)?,
                Target::Remote(api) => api.delete(&id)?,
            }
        }
        Command::List { collection } => {
            let collection = Collection::new(&collection)?;
            let node = match target(cli.data)? {
                Target::Local(node) => node,
                Target::Remote(api) => {
                    let mut after: Option<String> = None;
                    loop {
                        let (records, next) = api.list(collection.as_str(), after.as_deref())?;
                        for record in records {
                            writeln!(out, "{record}")?;
                        }
                        match next {
                            Some(next) => after = Some(next),
                            None => return Ok(()),
                        }
                    }
                }
            };
            let mut after: Option<Key> = None;
            loop {
                let page = node.list(&collection, after.as_ref(), LIST_PAGE_RECORDS)?;
                for (key, fields) in page.records {
                    let line = serde_json::json!({"key": key.as_str(), "fields": fields});
                    writeln!(out, "{line}")?;
                }
                match page.last_seen {
                    Some(last) => after = Some(last),
                    None => break,
                }
            }
        }
        Command::History { id, after, limit } => {
            let id = RecordId::parse(&id)?;
            let limit = concord::node::page_limit(
                limit.unwrap_or(concord::node::HISTORY_CHANGES_MAX),
                concord::node::HISTORY_CHANGES_MAX,
            )?;
            match target(cli.data)? {
                Target::Local(node) => {
                    let after = match after {
                        Some(text) => Some(node.resolve_version(&id, &text)?),
                        None => None,
                    };
                    for entry in node.history_replay(&id, after.as_ref(), Some(limit))? {
                        writeln!(out, "{}", serde_json::to_string(&entry?)?)?;
                    }
                }
                Target::Remote(api) => {
                    // Page by page, each printed as it comes: a short first page, so
                    // the first changes show at once, then long ones.
                    let mut after = after;
                    let mut left = limit;
                    let mut page_size = HISTORY_FIRST_PAGE;
                    while left > 0 {
                        let asked = left.min(page_size);
                        page_size = HISTORY_PAGE;
                        let page = api.history(&id, after.as_deref(), asked)?;
                        for entry in &page {
                            writeln!(out, "{entry}")?;
                        }
                        left = left.saturating_sub(page.len());
                        if page.len() < asked {
                            break;
                        }
                        after = page
                            .last()
                            .and_then(|entry| entry["hash"].as_str())
                            .map(str::to_owned);
                    }
                }
            }
        }
        Command::Export { id, file, output } => {
            let output = file.or(output).unwrap_or_else(|| PathBuf::from("-"));
            let id = RecordId::parse(&id)?;
            let bytes = match target(cli.data)? {
                Target::Local(node) => node.export(&id)?,
                Target::Remote(api) => api.export(&id)?,
            };
            if output == Path::new("-") {
                out.write_all(&bytes)?;
            } else {
                std::fs::write(&output, &bytes)
                    .with_context(|| format!("cannot write {}", output.display()))?;
            }
        }
        Command::Import { id, file } => {
            let id = RecordId::parse_user(&id)?;
            let bytes = if file == Path::new("-") {
                use std::io::Read;
                let mut bytes = Vec::new();
                std::io::Read::take(
                    std::io::stdin().lock(),
                    concord::node::IMPORT_BYTES_MAX as u64 + 1,
                )
                .read_to_end(&mut bytes)
                .context("cannot read stdin")?;
                bytes
            } else {
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            if bytes.len() > concord::node::IMPORT_BYTES_MAX {
                bail!(
                    "{} is over the limit of {} bytes for one import; nothing \
                     was stored",
                    file.display(),
                    concord::node::IMPORT_BYTES_MAX
                );
            }
            let new_changes = match target(cli.data)? {
                Target::Local(node) => {
                    node.import(&id, &bytes)
                        .with_context(|| format!("cannot import {}", file.display()))?
                        .new_changes as u64
                }
                Target::Remote(api) => api
                    .import(&id, &bytes)
                    .with_context(|| format!("cannot import {}", file.display()))?,
            };
            writeln!(out, "merged {new_changes} new changes into {id}")?;
        }
        Command::Load {
            collection,
            file,
            key_field,
            batch,
            ack,
            skip_bad,
        } => {
            let collection = Collection::new_user(&collection)?;
            if batch == 0 || batch > LOAD_BATCH_RECORDS_MAX {
                bail!("--batch must be between 1 and {LOAD_BATCH_RECORDS_MAX}");
            }
            let target = target(cli.data)?;
            let input: Box<dyn BufRead> = match file {
                Some(path) if path != Path::new("-") => Box::new(std::io::BufReader::new(
                    std::fs::File::open(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )),
                _ => Box::new(std::io::stdin().lock()),
            };
            let options = LoadOptions {
                key_field,
                batch_records: batch,
                ack,
                skip_bad,
            };
            load(&target, &collection, input, &options, out)?;
        }
        Command::Demo { dir, cli: true, .. } => demo::run(dir, out)?,
        Command::Demo {
            dir,
            partition: true,
            ..
        } => cluster_demo::run(dir, out)?,
        Command::Demo {
            dir,
            postgres,
            sqlite_only,
            ..
        } => table_demo::run(
            table_demo::Options {
                dir,
                postgres: (!sqlite_only).then_some(postgres),
            },
            out,
        )?,
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn print_status(status: &Json, out: &mut dyn Write) -> Result<()> {
    let text = |key: &str| status[key].as_str().unwrap_or("?").to_owned();
    writeln!(out, "node     {} ({})", text("node"), text("name"))?;
    writeln!(out, "writer   {}", text("writer"))?;
    writeln!(out, "cluster  {}", text("cluster"))?;
    writeln!(out, "listen   {}", text("listen"))?;
    writeln!(out, "records  {}", status["records"])?;
    // A node's standing in the status: its grant, none (it reads and writes all), or revoked.
    let standing = |node: &Json| {
        if node["revoked"] == Json::Bool(true) {
            "revoked".to_owned()
        } else if node["grant"].is_null() {
            "reads and writes all".to_owned()
        } else {
            format!(
                "grant read {} write {}",
                node["grant"]["read"], node["grant"]["write"]
            )
        }
    };
    writeln!(out, "scope    {}", standing(status))?;
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let unreachable = status["unreachable"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    writeln!(
        out,
        "peers    {} connected, {} unreachable",
        peers.len(),
        unreachable.len()
    )?;
    let field = |value: &Json, key: &str| value[key].as_str().unwrap_or("?").to_owned();
    for peer in &peers {
        let lag = peer["lag"]
            .as_u64()
            .map_or("not known yet".to_owned(), |lag| format!("{lag} changes"));
        writeln!(
            out,
            "  {} ({}) at {}: {}, lag {lag}, policies {}, {}",
            field(peer, "name"),
            field(peer, "node"),
            field(peer, "address"),
            field(peer, "state"),
            field(peer, "policies"),
            standing(peer),
        )?;
    }
    for peer in &unreachable {
        let node = peer["node"]
            .as_str()
            .map_or(String::new(), |node| format!(" (node {node})"));
        writeln!(
            out,
            "  unreachable {}{node}: {} ({} attempts failed in a row)",
            field(peer, "address"),
            field(peer, "error"),
            peer["failures"]
        )?;
    }
    for peer in peers.iter().filter(|peer| peer["policies"] == "differ") {
        writeln!(
            out,
            "warning  {}'s conflict policies differ from this node's: the same records resolve \
             to different values there (compare [[policies]] in concord.toml)",
            field(peer, "name")
        )?;
    }
    for peer in peers
        .iter()
        .filter(|peer| peer["changes_ahead"].as_u64().unwrap_or(0) > 0)
    {
        writeln!(
            out,
            "warning  {} sent {} changes stamped ahead of this node's clock by more than \
             node.clock_ahead_max_ms: the two clocks disagree (check NTP on both)",
            field(peer, "name"),
            peer["changes_ahead"]
        )?;
    }
    let engine = &status["engine"];
    writeln!(
        out,
        "changes  sent {}, received {}, applied {}, duplicates {}",
        engine["changes_sent"],
        engine["changes_received"],
        engine["changes_applied"],
        engine["duplicates"]
    )?;
    let this_node = text("node");
    for grant in status["grants"].as_array().cloned().unwrap_or_default() {
        let node = field(&grant, "node");
        let whose = if node == this_node {
            " (this node)"
        } else {
            ""
        };
        if grant["revoked"] == Json::Bool(true) {
            writeln!(out, "revoked  {node}{whose}")?;
        } else if grant["removed"] == Json::Bool(true) {
            writeln!(out, "removed  {node}{whose}")?;
        } else {
            writeln!(
                out,
                "grant    {node}{whose}: read {}, write {}",
                grant["read"], grant["write"]
            )?;
        }
    }
    for (key, what) in [
        ("degraded", "degraded (writes refused with 507)"),
        ("overloaded", "overloaded (writes refused with 503)"),
    ] {
        if let Some(reason) = status[key].as_str() {
            writeln!(out, "warning  {what}: {reason}")?;
        }
    }
    for binding in status["bindings"].as_array().cloned().unwrap_or_default() {
        let text = |key: &str| binding[key].as_str().unwrap_or("?").to_owned();
        writeln!(
            out,
            "binding  {} ({} {} {}, {}): {}; captured {}, written {}, applied {}, quarantined {}",
            text("name"),
            text("adapter"),
            text("table"),
            text("direction"),
            text("collection"),
            text("state"),
            binding["rows_captured"],
            binding["records_written"],
            binding["rows_applied"],
            binding["quarantined"]
        )?;
    }
    Ok(())
}

/// An error and its causes on one line, each said once: many errors already name their
/// cause in their own text, and the chain would repeat it.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Reads `FIELD=PATH` into `FIELD=CONTENTS`, refusing a file larger than a request may be.
/// One `--read` or `--write` scope. A scope's value is data, so a comma never starts another
/// scope; a list given the old way, `a,b`, fails as a collection name, and says so.
fn parse_scope(text: &str) -> Result<concord::scope::Scope> {
    concord::scope::Scope::parse(text).map_err(|error| {
        let hint = if text.contains(',') && !text.contains(':') {
            " (give one scope per flag: --read a --read b)"
        } else {
            ""
        };
        anyhow::anyhow!("{error}{hint}")
    })
}

/// Changes asked of a running node's API by `concord history`: first, then at a time (each
/// page replays the record up to its end, so long pages keep a long history linear).
const HISTORY_FIRST_PAGE: usize = 1000;
const HISTORY_PAGE: usize = concord::node::api::LIST_LIMIT_MAX;

fn read_value_file(assignment: &str) -> Result<String> {
    use std::io::Read;
    let Some((field, path)) = assignment.split_once('=') else {
        bail!("{assignment:?} is not FIELD=PATH");
    };
    let limit = concord::node::api::REQUEST_BYTES_MAX;
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {path}"))?;
    let mut contents = String::new();
    file.take(limit as u64 + 1)
        .read_to_string(&mut contents)
        .with_context(|| format!("cannot read {path} as UTF-8 text"))?;
    if contents.len() > limit {
        bail!("{path} is over the limit of {limit} bytes for one write; nothing was stored");
    }
    if contents.is_empty() {
        bail!("{path} is empty (to remove the field, give {field}=)");
    }
    Ok(format!("{field}={contents}"))
}

/// Turns `FIELD=VALUE` arguments into a write.
fn parse_assignments(assignments: &[String]) -> Result<RecordWrite> {
    let mut write = RecordWrite::default();
    for assignment in assignments {
        let Some((field, value)) = assignment.split_once('=') else {
            bail!("{assignment:?} is not FIELD=VALUE");
        };
        if value.is_empty() {
            write.remove.push(field.to_owned());
        } else {
            let value =
                serde_json::from_str(value).unwrap_or_else(|_| Json::String(value.to_owned()));
            write.set.push((field.to_owned(), value));
        }
    }
    write.check()?;
    Ok(write)
}

/// A spinner on stderr that shows `template`.
fn spinner(template: &str) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template(template).expect("the progress template is valid"),
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(200));
    progress
}

/// `concord backup`: through the API while the node runs, from the store while it is stopped;
/// into `FILE.partial`, checked, then renamed to `output`.
fn backup(dir: &Path, output: &Path, out: &mut dyn Write) -> Result<()> {
    let partial = output.with_extension("partial");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(concord::files::FILE_MODE)
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let progress = spinner("{spinner} backing up: {msg}");
    let show = |bytes: u64| progress.set_message(format!("{} MiB", bytes / (1024 * 1024)));
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let written = match concord::node::maintenance::backup(dir, &mut writer, show) {
        Ok(_) => Ok(()),
        Err(concord::node::maintenance::MaintenanceError::Refused(_)) => {
            // The node runs: its API streams the backup.
            remote::ApiClient::for_data_dir(dir)?.backup(&mut writer, show)
        }
        Err(error) => Err(error.into()),
    };
    let written = written.and_then(|()| {
        writer.flush()?;
        writer
            .into_inner()
            .map_err(|error| error.into_error())?
            .sync_all()?;
        Ok(())
    });
    if let Err(error) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    // Read back whole before it takes the name asked for.
    let check = std::fs::File::open(&partial)?;
    let records = concord::store::backup::read_backup(
        std::io::BufReader::with_capacity(1 << 20, check),
        |_| {},
        |_| Ok(()),
        |bytes| progress.set_message(format!("checking: {} MiB", bytes / (1024 * 1024))),
    );
    progress.finish_and_clear();
    let records = match records {
        Ok(records) => records,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            bail!("the backup did not read back whole: {error}");
        }
    };
    std::fs::rename(&partial, output)?;
    let bytes = std::fs::metadata(output)?.len();
    writeln!(
        out,
        "{}",
        serde_json::json!({"file": output.display().to_string(), "records": records, "bytes": bytes})
    )?;
    Ok(())
}

/// How `concord load` goes about it.
struct LoadOptions {
    key_field: String,
    batch_records: usize,
    ack: bool,
    skip_bad: bool,
}

/// Bytes of encoded writes `load` sends a running node in one batch at most: half of what
/// one request may carry, so that a batch of records near the largest still fits.
const LOAD_BATCH_BYTES_MAX: usize = concord::node::api::REQUEST_BYTES_MAX / 2;
/// Bad lines `load --skip-bad` names on stderr, one by one; past this it only counts them.
const LOAD_BAD_LINES_SHOWN: usize = 100;

/// Records read so far, waiting to be written together.
#[derive(Default)]
struct LoadBatch {
    records: Vec<(RecordId, RecordWrite)>,
    /// Their encodings for a running node's batch endpoint, and those bytes.
    encoded: Vec<Json>,
    bytes: usize,
}

impl LoadBatch {
    fn write(&mut self, target: &Target) -> Result<()> {
        match target {
            Target::Local(node) => {
                node.put_many(self.records.iter().map(|(id, write)| (id, write)))?;
            }
            // A running node takes the batch through its API, durable by one flush.
            Target::Remote(api) => api.put_batch(&self.encoded)?,
        }
        Ok(())
    }
}

fn load(
    target: &Target,
    collection: &Collection,
    input: Box<dyn BufRead>,
    options: &LoadOptions,
    out: &mut dyn Write,
) -> Result<()> {
    let progress = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} records loaded ({per_sec})")
            .expect("the progress template is valid"),
    );
    let mut batch = LoadBatch::default();
    let mut lines = input.lines();
    let mut line_number = 0usize;
    let mut loaded = 0u64;
    let mut bad = 0usize;
    let mut stop: Option<anyhow::Error> = None;
    loop {
        let line = lines.next().transpose().context("cannot read input")?;
        if let Some(line) = &line {
            line_number += 1;
            let parsed = if line.len() > LOAD_LINE_BYTES_MAX {
                Err(anyhow::anyhow!("longer than {LOAD_LINE_BYTES_MAX} bytes"))
            } else if line.trim().is_empty() {
                Ok(None)
            } else {
                parse_load_line(collection, line, &options.key_field).map(Some)
            };
            match parsed {
                Ok(Some((id, write))) => {
                    if matches!(target, Target::Remote(_)) {
                        let entry = serde_json::json!({
                            "id": id.to_string(),
                            "fields": write.set.iter().cloned().collect::<Map<_, _>>(),
                            "replace": true,
                        });
                        let size = entry.to_string().len();
                        if !batch.encoded.is_empty() && batch.bytes + size > LOAD_BATCH_BYTES_MAX {
                            flush_load_batch(
                                target,
                                &mut batch,
                                &mut loaded,
                                &progress,
                                options,
                                out,
                            )?;
                        }
                        batch.bytes += size;
                        batch.encoded.push(entry);
                    }
                    batch.records.push((id, write));
                }
                Ok(None) => {}
                Err(error) if options.skip_bad => {
                    bad += 1;
                    if bad <= LOAD_BAD_LINES_SHOWN {
                        progress.suspend(|| {
                            eprintln!("line {line_number}: {} (skipped)", error_text(&error))
                        });
                    }
                }
                Err(error) => {
                    stop = Some(error.context(format!(
                        "line {line_number} (the lines before it are loaded; --skip-bad loads \
                         the rest)"
                    )));
                }
            }
        }
        let last = line.is_none() || stop.is_some();
        if batch.records.len() >= options.batch_records || (last && !batch.records.is_empty()) {
            flush_load_batch(target, &mut batch, &mut loaded, &progress, options, out)?;
        }
        if last {
            break;
        }
    }
    progress.finish_and_clear();
    if let Some(error) = stop {
        return Err(error);
    }
    if bad > 0 {
        eprintln!("loaded {loaded} records; skipped {bad} bad lines");
    }
    tracing::info!(records = loaded, bad, "load finished");
    Ok(())
}

fn flush_load_batch(
    target: &Target,
    batch: &mut LoadBatch,
    loaded: &mut u64,
    progress: &indicatif::ProgressBar,
    options: &LoadOptions,
    out: &mut dyn Write,
) -> Result<()> {
    batch.write(target)?;
    *loaded += batch.records.len() as u64;
    progress.set_position(*loaded);
    if options.ack {
        for (id, _) in &batch.records {
            writeln!(out, "{id}")?;
        }
        out.flush()?;
    }
    *batch = LoadBatch::default();
    Ok(())
}

fn parse_load_line(
    collection: &Collection,
    line: &str,
    key_field: &str,
) -> Result<(RecordId, RecordWrite)> {
    let value: Json = serde_json::from_str(line).context("not valid JSON")?;
    let Json::Object(fields) = value else {
        bail!("not a JSON object");
    };
    let key = match fields.get(key_field) {
        Some(Json::String(key)) => key.clone(),
        Some(Json::Number(key)) => key.to_string(),
        Some(_) => bail!("field {key_field:?} must be a string or a number"),
        None => bail!("no field {key_field:?} to take the key from"),
    };
    let id = RecordId::new(collection.clone(), Key::new(&key)?);
    let write = RecordWrite::replace_with(fields.into_iter().collect::<Map<_, _>>());
    write.check()?;
    Ok((id, write))
}
