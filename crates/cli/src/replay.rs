//! `sluice replay`: events from the event store to a topic, or into a new version of a
//! projection. Every replay is a job in the store (who, what, progress, state): it reports its
//! progress after each page, so a crashed or interrupted job resumes after the last page done
//! (`sluice replay resume`), and it sees a cancel at its next page.
//!
//! To a topic, events go in position order with their aggregate as key (so in order per
//! aggregate), marked in their headers with the job and what side effects they may have.
//! A rebuild registers a new version of the projection that the projector also writes from
//! then on, fills it from the event store, then switches readers to it and drops the old one
//! (docs/operations.md, "Rebuilds").

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use sluice_core::{EventType, Replay};
use sluice_log::{KafkaLog, Log, Producer};
use sluice_projector::Projected;
use sluice_schemas::{AnySchemas, EventCodec, HttpRegistry, Registry};
use sluice_store::{
    EventQuery, JobState, NewReplayJob, ProjectionBatch, RebuildStep, ReplayJob, Store,
};
use sluice_topology::{Kind, Topology};
use tokio_util::sync::CancellationToken;

use crate::cli::{
    ReplayActions, ReplayArgs, ReplayCommand, ReplayInference, ReplayStart, ReplayWiring,
};
use crate::commands::{load_schemas, runtime};
use crate::ops::{Ops, open_embedded, parse_time, progress};

/// Events per page: read, published or projected, then recorded as progress.
const PAGE: u32 = 5_000;
/// A running job not heard of for this long has crashed; `resume` may take it over.
const STALE_AFTER: Duration = Duration::from_secs(30);
/// How long readers get to move to a rebuilt version before the old one is dropped (the SQL
/// endpoint looks every second).
const DROP_GRACE: Duration = Duration::from_secs(10);
/// The event types the projector builds its read models from in the event store.
const PROJECTED_TYPES: [&str; 2] = [EventType::SENSOR_READING, EventType::DEVICE_STATUS];

/// What a job selects and how it runs, as stored in the job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Selection {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub types: Vec<String>,
    pub aggregates: Vec<String>,
    pub rate: Option<u32>,
    pub actions: ReplayActions,
    pub inference: ReplayInference,
}

impl Selection {
    fn query(&self) -> Result<EventQuery> {
        Ok(EventQuery {
            from: self.from,
            to: self.to,
            event_types: self
                .types
                .iter()
                .map(|t| EventType::new(t.clone()))
                .collect::<Result<_, _>>()?,
            aggregate_ids: self.aggregates.clone(),
            ..EventQuery::default()
        })
    }
}

pub fn replay(args: &ReplayArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        match &args.command {
            None => start(&args.start).await,
            Some(ReplayCommand::List { json, target }) => {
                let ops = Ops::connect(target).await?;
                let r = list(&ops, *json).await;
                ops.store.close().await;
                r
            }
            Some(ReplayCommand::Resume {
                id,
                force,
                wiring,
                target,
            }) => {
                let ops = Ops::connect(target).await?;
                let r = resume(&ops, id, *force, wiring).await;
                ops.store.close().await;
                r
            }
            Some(ReplayCommand::Cancel { id, target }) => {
                let ops = Ops::connect(target).await?;
                let state = ops.store.cancel_replay_job(id, &ops.who, STALE_AFTER).await;
                ops.store.close().await;
                match state? {
                    JobState::Cancelling => println!("job {id} stops at its next page"),
                    state => println!("job {id} is {state}"),
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

async fn start(args: &ReplayStart) -> Result<ExitCode> {
    let now = Utc::now();
    let selection = Selection {
        from: args
            .from
            .as_deref()
            .map(|t| parse_time(t, now))
            .transpose()?,
        to: args.to.as_deref().map(|t| parse_time(t, now)).transpose()?,
        types: args.types.clone(),
        aggregates: args.aggregates.clone(),
        rate: args.rate,
        actions: args.actions,
        inference: args.inference,
    };
    for t in &selection.types {
        EventType::new(t.clone()).map_err(|e| anyhow!("--type {t}: {e}"))?;
    }
    if args.rate == Some(0) {
        bail!("--rate must be at least 1 event per second");
    }
    let topology = crate::dev::dev_topology(args.wiring.topology.as_deref())?;
    let target = match (&args.to_topic, &args.rebuild) {
        (Some(topic), None) => format!("topic:{topic}"),
        (None, Some(projection)) => {
            projector(&topology, projection)?;
            if !selection.types.is_empty()
                || !selection.aggregates.is_empty()
                || selection.from.is_some()
                || selection.to.is_some()
            {
                bail!(
                    "a rebuild reads the whole event store (a partial history would be a wrong \
                     projection): drop --from, --to, --type and --aggregate"
                );
            }
            format!("rebuild:{projection}")
        }
        _ => bail!("give --to-topic TOPIC or --rebuild PROJECTION"),
    };
    let ops = Ops::connect(&args.target).await?;
    let result = async {
        let mut query = selection.query()?;
        if target.starts_with("rebuild:") {
            query.event_types = PROJECTED_TYPES
                .iter()
                .map(|t| EventType::new(*t))
                .collect::<Result<_, _>>()?;
        }
        let total = ops.store.count_events(&query).await?;
        if args.dry_run {
            println!(
                "would replay {total} event(s) ({}) to {}; nothing changed",
                describe(&selection),
                target.replace(':', " ")
            );
            return Ok(ExitCode::SUCCESS);
        }
        let job_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let job = ops
            .store
            .create_replay_job(&NewReplayJob {
                job_id,
                created_by: ops.who.clone(),
                selection: serde_json::to_value(&selection)?,
                target,
                total,
            })
            .await?;
        eprintln!(
            "replay job {} started: {total} event(s) to {} (resume with `sluice replay resume {}`)",
            job.job_id, job.target, job.job_id
        );
        run_job(&ops, &job, &topology, &args.wiring).await
    }
    .await;
    ops.store.close().await;
    result
}

async fn resume(ops: &Ops, id: &str, force: bool, wiring: &ReplayWiring) -> Result<ExitCode> {
    let topology = crate::dev::dev_topology(wiring.topology.as_deref())?;
    let stale_after = if force { Duration::ZERO } else { STALE_AFTER };
    let job = ops
        .store
        .resume_replay_job(id, &ops.who, stale_after)
        .await
        .map_err(|e| match e {
            sluice_store::Error::InvalidArgument { reason, .. }
                if !force && reason.contains("heard of") =>
            {
                anyhow!("{reason}; if its worker is dead, add --force")
            }
            e => e.into(),
        })?;
    eprintln!(
        "replay job {} resumed after position {} ({} of {} done)",
        job.job_id, job.cursor, job.done, job.total
    );
    run_job(ops, &job, &topology, wiring).await
}

async fn list(ops: &Ops, json: bool) -> Result<ExitCode> {
    let jobs = ops.store.replay_jobs(100).await?;
    if json {
        let rows: Vec<Value> = jobs.iter().map(job_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if jobs.is_empty() {
        println!("no replay jobs");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12}  {:<20}  {:<10}  {:>19}  {:<32}  by",
        "job", "created", "state", "done/total", "target"
    );
    for j in &jobs {
        let mut state = j.state.to_string();
        if matches!(j.state, JobState::Running | JobState::Cancelling)
            && j.is_stale(Utc::now(), STALE_AFTER)
        {
            state.push_str(" (stale)");
        }
        println!(
            "{:<12}  {:<20}  {:<10}  {:>19}  {:<32}  {}",
            j.job_id,
            j.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            state,
            format!("{}/{}", j.done, j.total),
            j.target,
            j.created_by
        );
        if let Some(e) = &j.error {
            println!("{:<12}  error: {e}", "");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn job_json(j: &ReplayJob) -> Value {
    json!({
        "job_id": j.job_id, "created_by": j.created_by, "created_at": j.created_at,
        "selection": j.selection, "target": j.target, "state": j.state.as_str(),
        "total": j.total, "done": j.done, "cursor": j.cursor, "started_at": j.started_at,
        "heartbeat_at": j.heartbeat_at, "finished_at": j.finished_at, "error": j.error,
    })
}

fn describe(s: &Selection) -> String {
    let mut parts = Vec::new();
    if !s.types.is_empty() {
        parts.push(format!("types {}", s.types.join(", ")));
    }
    if !s.aggregates.is_empty() {
        parts.push(format!("aggregates {}", s.aggregates.join(", ")));
    }
    if let Some(t) = s.from {
        parts.push(format!(
            "from {}",
            t.to_rfc3339_opts(SecondsFormat::Secs, true)
        ));
    }
    if let Some(t) = s.to {
        parts.push(format!(
            "to {}",
            t.to_rfc3339_opts(SecondsFormat::Secs, true)
        ));
    }
    if parts.is_empty() {
        "every event".into()
    } else {
        parts.join("; ")
    }
}

/// The projector named `name`, or which projectors there are.
fn projector<'a>(topology: &'a Topology, name: &str) -> Result<&'a sluice_topology::Processor> {
    match topology.processor(name) {
        Some(p) if p.kind == Kind::Projector => Ok(p),
        _ => {
            let names: Vec<&str> = topology
                .processors
                .iter()
                .filter(|p| p.kind == Kind::Projector)
                .map(|p| p.name.as_str())
                .collect();
            bail!(
                "no projector {name:?} in the topology; projections are named after their projector: {}",
                names.join(", ")
            )
        }
    }
}

/// Runs `job` to its end, a cancel, an interrupt (Ctrl-C: the job is left failed, to resume)
/// or an error (likewise).
async fn run_job(
    ops: &Ops,
    job: &ReplayJob,
    topology: &Topology,
    wiring: &ReplayWiring,
) -> Result<ExitCode> {
    let selection: Selection = serde_json::from_value(job.selection.clone())
        .context("the job's selection is not one this version understands")?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    let signal = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    let outcome = if let Some(topic) = job.target.strip_prefix("topic:") {
        let url = ops.log_url()?.to_owned();
        let codec = Arc::new(EventCodec::new(schemas(ops, wiring)?));
        if url.starts_with("embedded://") {
            let log = open_embedded(&url)?;
            crate::run::ensure_topics(&log, topology, &[topic], true).await?;
            to_topic(&ops.store, job, &selection, &log, topic, &codec, &stop).await
        } else if url.starts_with("kafka://") {
            let log = KafkaLog::from_url(&url)?;
            to_topic(&ops.store, job, &selection, &log, topic, &codec, &stop).await
        } else {
            Err(anyhow!(
                "invalid log URL {url:?}: expected embedded://DIR or kafka://host:port"
            ))
        }
    } else if let Some(projection) = job.target.strip_prefix("rebuild:") {
        rebuild(ops, job, &selection, topology, projection, &stop).await
    } else {
        Err(anyhow!(
            "job {} has an unknown target {}",
            job.job_id,
            job.target
        ))
    };
    signal.abort();
    match outcome {
        Ok(Ended::Done(summary)) => {
            ops.store
                .finish_replay_job(&job.job_id, JobState::Done, None)
                .await?;
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Ended::Cancelled) => {
            ops.store
                .finish_replay_job(&job.job_id, JobState::Cancelled, None)
                .await?;
            println!("job {} cancelled", job.job_id);
            Ok(ExitCode::FAILURE)
        }
        Ok(Ended::Interrupted) => {
            ops.store
                .finish_replay_job(&job.job_id, JobState::Failed, Some("interrupted"))
                .await?;
            eprintln!(
                "interrupted; resume with `sluice replay resume {}`",
                job.job_id
            );
            Ok(ExitCode::from(130))
        }
        Err(e) => {
            let message = format!("{e:#}");
            // Best effort: the job stays resumable even if this write fails (it goes stale).
            let _ = ops
                .store
                .finish_replay_job(&job.job_id, JobState::Failed, Some(&message))
                .await;
            Err(e.context(format!(
                "replay job {} failed; fix the cause and `sluice replay resume {}`",
                job.job_id, job.job_id
            )))
        }
    }
}

pub(crate) enum Ended {
    Done(String),
    Cancelled,
    Interrupted,
}

/// The registry replayed events are encoded with: the one their consumers decode with.
fn schemas(ops: &Ops, wiring: &ReplayWiring) -> Result<AnySchemas> {
    if let Some(url) = &wiring.registry {
        let registry = HttpRegistry::new(url)
            .with_context(|| format!("cannot use the schema registry {url}"))?;
        return Ok(AnySchemas::Remote(Arc::new(registry)));
    }
    if wiring.schemas.is_none()
        && let Some(dir) = &ops.data_dir
    {
        // `sluice dev`'s own registry, so schema ids match what its processors know.
        let registry_dir = dir.join("registry");
        let registry = Registry::open(&registry_dir)
            .with_context(|| format!("cannot open the registry in {}", registry_dir.display()))?;
        return Ok(AnySchemas::Local(Arc::new(registry)));
    }
    let dir = wiring
        .schemas
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("schemas"));
    let registry = Arc::new(Registry::in_memory());
    registry
        .register_dir(&load_schemas(&dir)?)
        .with_context(|| format!("cannot register the schemas of {}", dir.display()))?;
    Ok(AnySchemas::Local(registry))
}

/// Keeps a job under `rate` events per second.
pub(crate) struct Pacer {
    rate: Option<u32>,
    started: Instant,
    base: u64,
}

impl Pacer {
    /// A pacer for a job that has `done` events done already.
    pub(crate) fn new(rate: Option<u32>, done: u64) -> Self {
        Self {
            rate,
            started: Instant::now(),
            base: done,
        }
    }

    async fn wait(&self, done: u64, stop: &CancellationToken) {
        let Some(rate) = self.rate else { return };
        let due = Duration::from_secs_f64((done - self.base) as f64 / f64::from(rate));
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::select! {
                () = tokio::time::sleep(due - elapsed) => {}
                () = stop.cancelled() => {}
            }
        }
    }
}

fn page_size(rate: Option<u32>) -> u32 {
    // A rated job pages at most every 100 ms, so its progress and pace stay smooth.
    rate.map_or(PAGE, |r| (r / 10).clamp(1, PAGE))
}

pub(crate) async fn to_topic<L: Log>(
    store: &Store,
    job: &ReplayJob,
    selection: &Selection,
    log: &L,
    topic: &str,
    codec: &EventCodec<AnySchemas>,
    stop: &CancellationToken,
) -> Result<Ended> {
    let producer = log.producer()?;
    let mark = Replay {
        job_id: job.job_id.clone(),
        fire_actions: selection.actions == ReplayActions::Fire,
        rescore: selection.inference == ReplayInference::Rescore,
    };
    let mut query = selection.query()?;
    query.limit = page_size(selection.rate);
    query.after_position = job.cursor;
    let bar = progress(job.total, &format!("replay {}", job.job_id));
    bar.set_position(job.done);
    let pacer = Pacer::new(selection.rate, job.done);
    let mut done = job.done;
    let started = Instant::now();
    // The next page is read while this one is encoded and published.
    let mut next = Some(tokio::spawn(fetch(store.clone(), query.clone())));
    while let Some(fetching) = next.take() {
        let page = fetching.await.context("the reader task failed")??;
        let Some(last) = page.last() else { break };
        let cursor = last.position;
        query.after_position = cursor;
        next = Some(tokio::spawn(fetch(store.clone(), query.clone())));
        let n = page.len() as u64;
        let mut records = Vec::with_capacity(page.len());
        for mut stored in page {
            stored.event.metadata.replay = Some(mark.clone());
            let (value, _) = codec.encode(&stored.event).await.with_context(|| {
                format!(
                    "cannot encode event {} (position {})",
                    stored.event.event_id, stored.position
                )
            })?;
            records.push(sluice_runtime::record_of(&stored.event, value));
        }
        producer
            .send(topic, records)
            .await
            .with_context(|| format!("cannot publish to {topic}"))?;
        done += n;
        if let Some(end) = progressed(store, job, cursor, done, &bar, &pacer, stop).await? {
            bar.abandon();
            return Ok(end);
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok(Ended::Done(format!(
        "replay job {}: {} event(s) published to {topic} in {:.1}s ({:.0} events/s); actions {}, inference {}",
        job.job_id,
        done - job.done,
        secs,
        (done - job.done) as f64 / secs,
        if mark.fire_actions {
            "fired"
        } else {
            "suppressed"
        },
        if mark.rescore { "re-scored" } else { "skipped" },
    )))
}

/// Records a job's progress after a page or step, then paces it; says when it must stop
/// instead (cancelled, or interrupted by Ctrl-C).
async fn progressed(
    store: &Store,
    job: &ReplayJob,
    cursor: i64,
    done: u64,
    bar: &indicatif::ProgressBar,
    pacer: &Pacer,
    stop: &CancellationToken,
) -> Result<Option<Ended>> {
    // Events keep coming during a rebuild: the total grows with them.
    if done > bar.length().unwrap_or(0) {
        bar.set_length(done);
    }
    bar.set_position(done);
    let state = store.replay_job_progress(&job.job_id, cursor, done).await?;
    if state == JobState::Cancelling {
        return Ok(Some(Ended::Cancelled));
    }
    if stop.is_cancelled() {
        return Ok(Some(Ended::Interrupted));
    }
    pacer.wait(done, stop).await;
    Ok(None)
}

async fn fetch(store: Store, query: EventQuery) -> Result<Vec<sluice_store::StoredEvent>> {
    Ok(store.events_in_range(&query).await?)
}

async fn rebuild(
    ops: &Ops,
    job: &ReplayJob,
    selection: &Selection,
    topology: &Topology,
    projection: &str,
    stop: &CancellationToken,
) -> Result<Ended> {
    let projector = projector(topology, projection)?;
    let initial = crate::run::projector_settings(projector).version;
    let store = &ops.store;
    let version = store
        .begin_projection_version(projection, initial, &job.job_id)
        .await?;
    let live = store.live_version(projection, initial).await?;
    eprintln!(
        "building version {version} of {projection} beside live version {live}; the projector writes both meanwhile"
    );
    let pacer = Pacer::new(selection.rate, job.done);
    let bar = progress(job.total, &format!("rebuild {projection} v{version}"));
    bar.set_position(job.done);
    let started = Instant::now();
    let built = match store.backend() {
        sluice_store::Backend::Postgres => {
            steps(store, job, version, selection.rate, &bar, &pacer, stop).await?
        }
        sluice_store::Backend::Sqlite => {
            batches(store, job, version, selection.rate, &bar, &pacer, stop).await?
        }
    };
    let (done, unprojectable) = match built {
        Built::Whole {
            done,
            unprojectable,
        } => (done, unprojectable),
        Built::Stopped(Ended::Cancelled) => {
            bar.abandon();
            store
                .abandon_projection_version(projection, version)
                .await?;
            return Ok(Ended::Cancelled);
        }
        Built::Stopped(ended) => {
            bar.abandon();
            return Ok(ended);
        }
    };
    bar.finish_and_clear();
    let built = started.elapsed();
    let retired = store
        .switch_projection_version(projection, version, &ops.who)
        .await?;
    eprintln!(
        "readers switched to version {version}; dropping version {retired} in {}s",
        DROP_GRACE.as_secs()
    );
    tokio::select! {
        () = tokio::time::sleep(DROP_GRACE) => {}
        () = stop.cancelled() => {}
    }
    let dropped = store.drop_retired_version(projection, retired).await?;
    let n = done - job.done;
    let secs = built.as_secs_f64().max(1e-9);
    Ok(Ended::Done(format!(
        "rebuilt {projection} as version {version} from {n} event(s) in {secs:.1}s ({:.0} events/s); \
         {unprojectable} unprojectable; version {retired} dropped ({dropped} rows)",
        n as f64 / secs
    )))
}

/// How the filling of a rebuilt version ended.
pub(crate) enum Built {
    /// Every event up to the log's head is in it.
    Whole { done: u64, unprojectable: u64 },
    /// Cancelled or interrupted.
    Stopped(Ended),
}

/// Positions per rebuild step: one transaction per lane.
const STEP: i64 = 50_000;
/// Lanes of a PostgreSQL rebuild: the server does the work, so two keep both cores busy.
const LANES: u32 = 2;

/// PostgreSQL: the version is filled set-based, step by step of positions, until the event
/// store's head (which moves while the fleet publishes: the projector writes the version too
/// from the moment it was registered, so the events after the head the loop ends at are
/// written by the projector).
pub(crate) async fn steps(
    store: &Store,
    job: &ReplayJob,
    version: i32,
    rate: Option<u32>,
    bar: &indicatif::ProgressBar,
    pacer: &Pacer,
    stop: &CancellationToken,
) -> Result<Built> {
    let step_size = rate.map_or(STEP, |r| i64::from(page_size(Some(r))));
    let (mut cursor, mut done, mut unprojectable) = (job.cursor, job.done, 0u64);
    loop {
        let head = store.last_position().await?;
        if cursor >= head {
            return Ok(Built::Whole {
                done,
                unprojectable,
            });
        }
        while cursor < head {
            let upto = (cursor + step_size).min(head);
            let lanes: Vec<RebuildStep> = (0..LANES)
                .map(|lane| RebuildStep {
                    version,
                    after: cursor,
                    upto,
                    lane,
                    lanes: LANES,
                })
                .collect();
            let steps = lanes.iter().map(|step| store.rebuild_step(step));
            for outcome in futures::future::try_join_all(steps).await? {
                done += outcome.events;
                unprojectable += outcome.unprojectable;
            }
            cursor = upto;
            if let Some(end) = progressed(store, job, cursor, done, bar, pacer, stop).await? {
                return Ok(Built::Stopped(end));
            }
        }
    }
}

/// SQLite: the version is filled through the projector's own path, page by page.
async fn batches(
    store: &Store,
    job: &ReplayJob,
    version: i32,
    rate: Option<u32>,
    bar: &indicatif::ProgressBar,
    pacer: &Pacer,
    stop: &CancellationToken,
) -> Result<Built> {
    let mut query = EventQuery {
        event_types: PROJECTED_TYPES
            .iter()
            .map(|t| EventType::new(*t))
            .collect::<Result<_, _>>()?,
        after_position: job.cursor,
        limit: page_size(rate),
        ..EventQuery::default()
    };
    let (mut done, mut unprojectable) = (job.done, 0u64);
    let mut next = Some(tokio::spawn(fetch(store.clone(), query.clone())));
    while let Some(fetching) = next.take() {
        let page = fetching.await.context("the reader task failed")??;
        let Some(last) = page.last() else { break };
        let cursor = last.position;
        query.after_position = cursor;
        next = Some(tokio::spawn(fetch(store.clone(), query.clone())));
        let mut batch = ProjectionBatch {
            version,
            ..ProjectionBatch::default()
        };
        for stored in &page {
            match sluice_projector::project(&stored.event) {
                Ok(Projected::Reading(r)) => batch.readings.push(*r),
                Ok(Projected::Status(s)) => batch.statuses.push(s),
                Ok(_) => {}
                // The live projector dead-lettered it when it came; counted, not again.
                Err(_) => unprojectable += 1,
            }
        }
        store.project(&batch).await?;
        done += page.len() as u64;
        if let Some(end) = progressed(store, job, cursor, done, bar, pacer, stop).await? {
            return Ok(Built::Stopped(end));
        }
    }
    Ok(Built::Whole {
        done,
        unprojectable,
    })
}
