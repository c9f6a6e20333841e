//! `concord load` (JSON lines in batches, with progress and a count of bad lines) and
//! `concord backup`.

use super::args::LoadArgs;
use super::*;

/// `concord backup`: through the API while the node runs, from the store while it is stopped;
/// into `FILE.partial`, checked, then renamed to `output`.
pub(super) fn backup(dir: &Path, output: &Path, out: &mut dyn Write) -> Result<()> {
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

impl LoadArgs {
    /// Refuses what can be refused before the node is reached; the collection to load.
    pub(super) fn check(&self) -> Result<Collection> {
        let collection = Collection::new_user(&self.collection)?;
        if self.batch == 0 || self.batch > LOAD_BATCH_RECORDS_MAX {
            bail!("--batch must be between 1 and {LOAD_BATCH_RECORDS_MAX}");
        }
        Ok(collection)
    }

    /// `concord load`, into the node `records` reaches.
    pub(super) fn run(self, records: &dyn Records, out: &mut dyn Write) -> Result<()> {
        let collection = self.check()?;
        let input: Box<dyn BufRead> = match &self.file {
            Some(path) if path != Path::new("-") => Box::new(std::io::BufReader::new(
                std::fs::File::open(path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            )),
            _ => Box::new(std::io::stdin().lock()),
        };
        load(records, &collection, input, &self, out)
    }
}

/// Bytes of encoded writes `load` sends a running node in one batch at most: half of what
/// one request may carry, so that a batch of records near the largest still fits.
pub(super) const LOAD_BATCH_BYTES_MAX: usize = concord::node::api::REQUEST_BYTES_MAX / 2;

/// Bad lines `load --skip-bad` names on stderr, one by one; past this it only counts them.
pub(super) const LOAD_BAD_LINES_SHOWN: usize = 100;

/// Records read so far, waiting to be written together, and the bytes of their encoding
/// as a running node's batch endpoint takes them (bounded alike on a stopped node).
#[derive(Default)]
pub(super) struct LoadBatch {
    records: Vec<(RecordId, RecordWrite)>,
    bytes: usize,
}

fn load(
    target: &dyn Records,
    collection: &Collection,
    input: Box<dyn BufRead>,
    options: &LoadArgs,
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
                    let size = remote::batch_entry(&id, &write).to_string().len();
                    if !batch.records.is_empty() && batch.bytes + size > LOAD_BATCH_BYTES_MAX {
                        flush_load_batch(target, &mut batch, &mut loaded, &progress, options, out)?;
                    }
                    batch.bytes += size;
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
        if batch.records.len() >= options.batch || (last && !batch.records.is_empty()) {
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

pub(super) fn flush_load_batch(
    target: &dyn Records,
    batch: &mut LoadBatch,
    loaded: &mut u64,
    progress: &indicatif::ProgressBar,
    options: &LoadArgs,
    out: &mut dyn Write,
) -> Result<()> {
    target.put_batch(&batch.records)?;
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

pub(super) fn parse_load_line(
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
