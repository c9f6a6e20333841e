//! The command line as clap reads it: every command, its arguments and its help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::*;

#[derive(Parser, Debug)]
#[command(
    name = "concord",
    version,
    about = "Masterless replication of business records"
)]
pub struct Cli {
    /// The node's data dir (made by `concord init`).
    #[arg(long, global = true, env = "CONCORD_DATA", value_name = "DIR")]
    pub(super) data: Option<PathBuf>,

    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand, Debug)]
pub(super) enum Command {
    /// Create a node's data dir: config, identity and an empty store.
    Init(InitArgs),
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
    #[command(flatten)]
    Record(RecordCommand),
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
    Restore(RestoreArgs),
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
    /// Two sites keep one table in step (hq on PostgreSQL where a server answers, else
    /// SQLite; depot on SQLite), edited at both while depot is offline. `--partition`: three
    /// sites, writes through the API, a partition and healing. `--cli`: a scripted CLI
    /// session on one embedded node.
    Demo(DemoArgs),
}

#[derive(Subcommand, Debug)]
pub(super) enum CaCommand {
    /// Create a cluster CA (certificate, key, cluster id) in CA_DIR.
    Init {
        #[arg(value_name = "CA_DIR")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum NodeCommand {
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

/// The commands that reach a node's records: the same on a stopped node (its data dir) and
/// on a running one (its API).
#[derive(Subcommand, Debug)]
pub(super) enum RecordCommand {
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
    Audit(AuditArgs),
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
    /// Write many records from JSON lines (one object per line), durably, in batches.
    Load(LoadArgs),
}

#[derive(Args, Debug)]
pub(super) struct InitArgs {
    pub(super) dir: PathBuf,
    /// A readable name for the node (default: node-<id prefix>).
    #[arg(long)]
    pub(super) name: Option<String>,
    /// A cluster CA dir (from `concord ca init`): issue this node's certificate from it.
    #[arg(long, value_name = "CA_DIR")]
    pub(super) ca: Option<PathBuf>,
    /// QUIC address for peers (default 127.0.0.1:7400).
    #[arg(long, value_name = "HOST:PORT")]
    pub(super) listen: Option<String>,
    /// HTTP API address (default 127.0.0.1:7480).
    #[arg(long, value_name = "HOST:PORT")]
    pub(super) api: Option<String>,
    /// A peer to dial; repeat for several.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub(super) peers: Vec<String>,
    /// The store's engine (default: the one the README names for new nodes).
    #[arg(long, value_name = "ENGINE")]
    pub(super) engine: Option<concord::store::Engine>,
}

impl InitArgs {
    pub(super) fn options(self) -> concord::node::InitOptions {
        concord::node::InitOptions {
            name: self.name,
            ca: self.ca,
            listen: self.listen,
            api: self.api,
            peers: self.peers,
            engine: self.engine,
        }
    }
}

#[derive(Args, Debug)]
pub(super) struct AuditArgs {
    /// Only this collection (Concord's own, such as `_actors`, only when named).
    #[arg(long)]
    pub(super) collection: Option<String>,
    /// Only this record (COLLECTION/KEY).
    #[arg(long)]
    pub(super) record: Option<String>,
    /// Only this source: `api`, or a binding's name.
    #[arg(long)]
    pub(super) source: Option<String>,
    /// Only this node (name or id).
    #[arg(long)]
    pub(super) node: Option<String>,
    /// From this time on (RFC 3339, such as 2026-11-26T10:00:00Z).
    #[arg(long)]
    pub(super) since: Option<String>,
    /// Up to this time (RFC 3339).
    #[arg(long)]
    pub(super) until: Option<String>,
    /// Most changes listed.
    #[arg(long, default_value_t = 1000)]
    pub(super) limit: usize,
}

#[derive(Args, Debug)]
pub(super) struct LoadArgs {
    pub(super) collection: String,
    /// The file to read ("-" or nothing for stdin).
    pub(super) file: Option<PathBuf>,
    /// The field of each object that holds the record key.
    #[arg(long, default_value = "id")]
    pub(super) key_field: String,
    /// Records per batch; a batch is acknowledged by one flush.
    #[arg(long, default_value_t = LOAD_BATCH_RECORDS_DEFAULT)]
    pub(super) batch: usize,
    /// Print `COLLECTION/KEY` for every record once it is durable.
    #[arg(long)]
    pub(super) ack: bool,
    /// Report each bad line (with its number) and load the rest; without it the load
    /// stops at the first bad line, with every line before it loaded.
    #[arg(long)]
    pub(super) skip_bad: bool,
}

#[derive(Args, Debug)]
pub(super) struct RestoreArgs {
    pub(super) file: PathBuf,
    pub(super) dir: PathBuf,
    /// The cluster CA dir, to restore onto a machine that lost the data dir.
    #[arg(long, value_name = "CA_DIR")]
    pub(super) ca: Option<PathBuf>,
    /// Put the backup in place of DIR's store (which is kept as store.replaced-<time>).
    #[arg(long)]
    pub(super) replace: bool,
    /// Make the store on this engine, and name it in DIR's config: how a
    /// node moves between engines (default: the engine DIR's config names, or the default
    /// for a new dir).
    #[arg(long, value_name = "ENGINE")]
    pub(super) engine: Option<concord::store::Engine>,
}

#[derive(Args, Debug)]
pub(super) struct DemoArgs {
    /// Where to put the demo's data dirs (default: a fresh temporary folder).
    #[arg(long)]
    pub(super) dir: Option<PathBuf>,
    /// Run the scripted CLI session on one embedded node.
    #[arg(long, conflicts_with = "partition")]
    pub(super) cli: bool,
    /// Run the three-site partition demo.
    #[arg(long)]
    pub(super) partition: bool,
    /// PostgreSQL server for hq's table (a database is made for the demo and dropped).
    #[arg(long, default_value = table_demo::DEMO_POSTGRES_DEFAULT)]
    pub(super) postgres: String,
    /// Use SQLite at both sites, even where PostgreSQL answers.
    #[arg(long)]
    pub(super) sqlite_only: bool,
}
