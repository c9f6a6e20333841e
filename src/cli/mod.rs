//! The `concord` command line.
//!
//! A contract that the README and the tests rely on. Exit codes: 0 on success, 1 for a usage
//! or data error (one line on stderr), 2 when the record asked for is not found. Logs go to
//! stderr through `tracing`, filtered by `RUST_LOG` (default `warn`).

mod args;
mod cluster_demo;
mod demo;
mod load;
mod remote;
mod status;
mod table_demo;

pub use args::Cli;
use args::{CaCommand, Command, NodeCommand};
use load::{backup, load, LoadOptions};
use status::print_status;

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
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
