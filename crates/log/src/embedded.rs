//! The embedded log (`embedded://DIR`): topics and partitions as folders of segment files in
//! the data directory, consumer groups coordinated in process, offsets in small JSON files.
//!
//! Why segment files: an append-only file per partition is what a log is; it needs no schema,
//! reads sequentially, and one `fdatasync` per produce batch makes the whole batch durable.
//! SQLite in WAL mode would add a B-tree and a page cache to an append-only workload, and the
//! embedded stores we looked at (sled, redb) buy transactions we do not need.

mod group;
mod partition;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use self::group::{Group, MemberId, group_file};
use self::partition::{PartitionLog, Stamped};
use crate::fsutil::{io, sync_dir, write_atomically};
use crate::{
    Consumer, Delivered, Error, Log, Message, Offset, PartitionLag, Producer, Record, Result,
    SeekTo, TopicPartition, TopicSpec, partition_for,
};

/// Settings of the embedded log.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// A partition starts a new segment file past this size; retention deletes whole segments.
    pub segment_bytes: u64,
    /// Fsync every produce batch before acknowledging it. Without it an acknowledged batch
    /// survives a crash of the process but not of the machine.
    pub fsync: bool,
    /// Most bytes one poll returns per partition.
    pub max_poll_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
            fsync: true,
            max_poll_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicFile {
    partitions: u32,
    #[serde(default)]
    retention_ms: Option<u64>,
    #[serde(default)]
    retention_bytes: Option<u64>,
}

#[derive(Debug)]
struct TopicLog {
    spec: TopicSpec,
    partitions: Vec<Arc<PartitionLog>>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    options: EmbeddedOptions,
    topics: RwLock<HashMap<String, Arc<TopicLog>>>,
    groups: std::sync::Mutex<HashMap<String, Arc<Group>>>,
    /// Bumped on every produce and group change; idle consumers wait on it.
    changed: watch::Sender<u64>,
    /// Held for the life of the log: two processes on one folder would corrupt it.
    _lock: File,
}

/// The embedded log. Cheap to clone; clones share the open files.
#[derive(Debug, Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Fatal(format!(
            "invalid {kind} name {name:?}: use letters, digits, '.', '_' and '-'"
        )))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl EmbeddedLog {
    /// Opens the log at `embedded://DIR`.
    pub fn from_url(url: &str) -> Result<Self> {
        let dir = url
            .strip_prefix("embedded://")
            .ok_or_else(|| Error::InvalidUrl {
                url: url.to_owned(),
                reason: "expected embedded://DIR".into(),
            })?;
        if dir.is_empty() {
            return Err(Error::InvalidUrl {
                url: url.to_owned(),
                reason: "the folder is missing".into(),
            });
        }
        Self::open(Path::new(dir), EmbeddedOptions::default())
    }

    /// Opens (or creates) the log in `dir`, recovering every partition after a crash.
    pub fn open(dir: &Path, options: EmbeddedOptions) -> Result<Self> {
        for sub in ["topics", "groups"] {
            fs::create_dir_all(dir.join(sub)).map_err(io(dir))?;
        }
        let lock_path = dir.join("LOCK");
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        lock.try_lock().map_err(|_| {
            Error::Fatal(format!(
                "{} is in use by another process (its LOCK is held)",
                dir.display()
            ))
        })?;
        let mut topics = HashMap::new();
        let topics_dir = dir.join("topics");
        for entry in fs::read_dir(&topics_dir).map_err(io(&topics_dir))? {
            let entry = entry.map_err(io(&topics_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.path().join("topic.json");
            let Ok(bytes) = fs::read(&meta) else {
                // A topic whose creation did not finish: it was never acknowledged.
                continue;
            };
            let file: TopicFile = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Fatal(format!("{}: {e}", meta.display())))?;
            let spec = TopicSpec {
                name: name.clone(),
                partitions: file.partitions,
                retention: file.retention_ms.map(Duration::from_millis),
                retention_bytes: file.retention_bytes,
            };
            topics.insert(name, Arc::new(open_topic(&entry.path(), spec, &options)?));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                options,
                topics: RwLock::new(topics),
                groups: std::sync::Mutex::default(),
                changed: watch::channel(0).0,
                _lock: lock,
            }),
        })
    }

    fn topic(&self, name: &str) -> Result<Arc<TopicLog>> {
        self.inner
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownTopic(name.to_owned()))
    }

    fn group(&self, name: &str) -> Result<Arc<Group>> {
        check_name("group", name)?;
        let mut groups = self.inner.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = groups.get(name) {
            return Ok(g.clone());
        }
        let g = Arc::new(Group::open(group_file(
            &self.inner.dir.join("groups"),
            name,
        ))?);
        groups.insert(name.to_owned(), g.clone());
        Ok(g)
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Deletes the segments that fall outside each topic's retention (by age of their newest
    /// record, and by partition size). Returns how many segments were deleted.
    pub fn enforce_retention(&self) -> Result<usize> {
        let topics: Vec<Arc<TopicLog>> = self
            .inner
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let now = now_ms();
        let mut deleted = 0;
        for t in topics {
            let cutoff = t.spec.retention.map(|r| now - r.as_millis() as i64);
            for p in &t.partitions {
                deleted += p.enforce_retention(cutoff, t.spec.retention_bytes)?;
            }
        }
        Ok(deleted)
    }

    /// The offset `group` has committed on a partition (the next it will read), if any.
    pub fn committed(&self, group: &str, tp: &TopicPartition) -> Result<Option<Offset>> {
        Ok(self.group(group)?.committed(tp))
    }

    /// The oldest offset kept in a partition.
    pub fn log_start(&self, tp: &TopicPartition) -> Result<Offset> {
        Ok(self.partition(tp)?.log_start())
    }

    fn partition(&self, tp: &TopicPartition) -> Result<Arc<PartitionLog>> {
        self.topic(&tp.topic)?
            .partitions
            .get(tp.partition as usize)
            .cloned()
            .ok_or_else(|| Error::UnknownPartition(tp.clone()))
    }
}

fn open_topic(dir: &Path, spec: TopicSpec, options: &EmbeddedOptions) -> Result<TopicLog> {
    let partitions = (0..spec.partitions as i32)
        .map(|p| {
            PartitionLog::open(
                &dir.join(p.to_string()),
                p,
                options.segment_bytes,
                options.fsync,
            )
            .map(Arc::new)
        })
        .collect::<Result<_>>()?;
    Ok(TopicLog { spec, partitions })
}

impl Log for EmbeddedLog {
    type Producer = EmbeddedProducer;
    type Consumer = EmbeddedConsumer;

    async fn create_topic(&self, spec: &TopicSpec) -> Result<()> {
        check_name("topic", &spec.name)?;
        if spec.partitions == 0 {
            return Err(Error::Fatal(format!(
                "topic {:?} needs at least one partition",
                spec.name
            )));
        }
        let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(&spec.name) {
            return if t.spec.partitions == spec.partitions {
                Ok(())
            } else {
                Err(Error::Fatal(format!(
                    "topic {:?} exists with {} partitions, not {}",
                    spec.name, t.spec.partitions, spec.partitions
                )))
            };
        }
        let dir = self.inner.dir.join("topics").join(&spec.name);
        let topic = open_topic(&dir, spec.clone(), &self.inner.options)?;
        // The metadata file is written last: a topic without it never existed.
        let meta = TopicFile {
            partitions: spec.partitions,
            retention_ms: spec.retention.map(|r| r.as_millis() as u64),
            retention_bytes: spec.retention_bytes,
        };
        let bytes = serde_json::to_vec(&meta)
            .map_err(|e| Error::Fatal(format!("cannot encode topic metadata: {e}")))?;
        write_atomically(&dir.join("topic.json"), &bytes)?;
        sync_dir(&self.inner.dir.join("topics"))?;
        topics.insert(spec.name.clone(), Arc::new(topic));
        Ok(())
    }

    async fn partitions(&self, topic: &str) -> Result<u32> {
        Ok(self.topic(topic)?.spec.partitions)
    }

    fn producer(&self) -> Result<EmbeddedProducer> {
        Ok(EmbeddedProducer {
            log: self.clone(),
            next: AtomicU32::new(0),
        })
    }

    fn consumer(&self, group: &str, topics: &[&str]) -> Result<EmbeddedConsumer> {
        let g = self.group(group)?;
        let mut partitions = Vec::new();
        for t in topics {
            let topic = self.topic(t)?;
            partitions.extend((0..topic.spec.partitions as i32).map(|p| TopicPartition::new(t, p)));
        }
        let member = g.join(partitions);
        self.bump();
        Ok(EmbeddedConsumer {
            changes: self.inner.changed.subscribe(),
            log: self.clone(),
            group: g,
            member,
            positions: BTreeMap::new(),
            stored: HashMap::new(),
            paused: HashSet::new(),
            turn: 0,
            left: false,
        })
    }
}

/// Produces to the embedded log.
#[derive(Debug)]
pub struct EmbeddedProducer {
    log: EmbeddedLog,
    /// Round-robin position for records without a key.
    next: AtomicU32,
}

impl Producer for EmbeddedProducer {
    async fn send(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Delivered>> {
        let t = self.log.topic(topic)?;
        let n = t.spec.partitions;
        let now = now_ms();
        let count = records.len();
        // Each record with its index in the batch, grouped by partition.
        let mut by_partition: BTreeMap<i32, Vec<(usize, Stamped)>> = BTreeMap::new();
        for (i, record) in records.into_iter().enumerate() {
            let p = match &record.key {
                Some(key) => partition_for(key, n),
                None => (self.next.fetch_add(1, Ordering::Relaxed) % n) as i32,
            };
            let ts = record.timestamp_ms.unwrap_or(now);
            by_partition.entry(p).or_default().push((i, (record, ts)));
        }
        // One blocking task per partition: their fsyncs overlap, and the file system can fold
        // them into one journal commit.
        let tasks: Vec<_> = by_partition
            .into_iter()
            .map(|(p, batch)| {
                let partition = t.partitions[p as usize].clone();
                tokio::task::spawn_blocking(move || {
                    let (indexes, records): (Vec<usize>, Vec<Stamped>) = batch.into_iter().unzip();
                    partition.append(&records).map(|first| (p, first, indexes))
                })
            })
            .collect();
        let mut delivered = vec![
            Delivered {
                partition: 0,
                offset: 0
            };
            count
        ];
        let mut failure = None;
        for task in tasks {
            // Wait for every partition even after a failure: each one's outcome is final.
            match task.await {
                Ok(Ok((p, first, indexes))) => {
                    for (j, i) in indexes.into_iter().enumerate() {
                        delivered[i] = Delivered {
                            partition: p,
                            offset: first + j as i64,
                        };
                    }
                }
                Ok(Err(e)) => failure = failure.or(Some(e)),
                Err(e) => {
                    failure = failure.or(Some(Error::Fatal(format!("produce task failed: {e}"))))
                }
            }
        }
        if let Some(e) = failure {
            self.log.bump();
            return Err(e);
        }
        self.log.bump();
        Ok(delivered)
    }
}

/// A member of a consumer group of the embedded log.
#[derive(Debug)]
pub struct EmbeddedConsumer {
    log: EmbeddedLog,
    group: Arc<Group>,
    member: MemberId,
    changes: watch::Receiver<u64>,
    /// Owned partitions and the next offset to read.
    positions: BTreeMap<TopicPartition, Offset>,
    stored: HashMap<TopicPartition, Offset>,
    paused: HashSet<TopicPartition>,
    /// Which owned partition to read first, for fairness.
    turn: usize,
    left: bool,
}

impl EmbeddedConsumer {
    fn sync(&mut self) -> Result<()> {
        let sync = self.group.sync(self.member, &self.stored)?;
        for tp in &sync.released {
            self.positions.remove(tp);
            self.stored.remove(tp);
            self.paused.remove(tp);
        }
        for (tp, committed) in sync.claimed {
            let start = match committed {
                Some(o) => o,
                None => self.log.log_start(&tp)?,
            };
            self.positions.insert(tp, start);
        }
        if !sync.released.is_empty() {
            // The released partitions are free now: wake whoever should claim them.
            self.log.bump();
        }
        Ok(())
    }

    fn read(&mut self, max: usize) -> Result<Vec<Message>> {
        let owned: Vec<TopicPartition> = self
            .positions
            .keys()
            .filter(|tp| !self.paused.contains(*tp))
            .cloned()
            .collect();
        let mut out = Vec::new();
        if owned.is_empty() {
            return Ok(out);
        }
        self.turn = (self.turn + 1) % owned.len();
        for i in 0..owned.len() {
            if out.len() >= max {
                break;
            }
            let tp = &owned[(self.turn + i) % owned.len()];
            let p = self.log.partition(tp)?;
            let from = self.positions[tp];
            if from >= p.high_watermark() {
                continue;
            }
            let (mut batch, next) = p.read(
                &tp.topic,
                from,
                max - out.len(),
                self.log.inner.options.max_poll_bytes,
            )?;
            self.positions.insert(tp.clone(), next);
            out.append(&mut batch);
        }
        Ok(out)
    }

    fn owned(&self, tp: &TopicPartition) -> Result<()> {
        if self.positions.contains_key(tp) {
            Ok(())
        } else {
            Err(Error::NotAssigned(tp.clone()))
        }
    }

    fn stored_offsets(&self) -> Vec<(TopicPartition, Offset)> {
        self.stored.iter().map(|(tp, o)| (tp.clone(), *o)).collect()
    }
}

impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Message>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Mark the current version seen before looking, so a produce that lands after the
            // look wakes the wait below.
            self.changes.borrow_and_update();
            self.sync()?;
            // Reads hit the page cache almost always; a short blocking read here costs less
            // than a hop to the blocking pool per poll.
            let batch = self.read(max.max(1))?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            match tokio::time::timeout_at(deadline, self.changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(Vec::new()),
            }
        }
    }

    fn store(&mut self, partition: &TopicPartition, next: Offset) -> Result<()> {
        self.owned(partition)?;
        self.stored.insert(partition.clone(), next);
        Ok(())
    }

    async fn commit(&mut self) -> Result<()> {
        let offsets = self.stored_offsets();
        let group = self.group.clone();
        let member = self.member;
        tokio::task::spawn_blocking(move || group.commit(member, &offsets))
            .await
            .map_err(|e| Error::Fatal(format!("commit task failed: {e}")))?
    }

    async fn seek(&mut self, partition: &TopicPartition, to: SeekTo) -> Result<()> {
        self.owned(partition)?;
        let p = self.log.partition(partition)?;
        let offset = match to {
            SeekTo::Offset(o) => o.clamp(p.log_start(), p.high_watermark()),
            SeekTo::Beginning => p.log_start(),
            SeekTo::End => p.high_watermark(),
            SeekTo::Timestamp(ts) => {
                let topic = partition.topic.clone();
                tokio::task::spawn_blocking(move || p.offset_for_time(&topic, ts))
                    .await
                    .map_err(|e| Error::Fatal(format!("seek task failed: {e}")))??
            }
        };
        self.positions.insert(partition.clone(), offset);
        Ok(())
    }

    fn pause(&mut self, partitions: &[TopicPartition]) -> Result<()> {
        for tp in partitions {
            self.owned(tp)?;
        }
        self.paused.extend(partitions.iter().cloned());
        Ok(())
    }

    fn resume(&mut self, partitions: &[TopicPartition]) -> Result<()> {
        for tp in partitions {
            self.paused.remove(tp);
        }
        self.log.bump();
        Ok(())
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.positions.keys().cloned().collect()
    }

    async fn lag(&self) -> Result<Vec<PartitionLag>> {
        self.positions
            .keys()
            .map(|tp| {
                let p = self.log.partition(tp)?;
                let committed = self.group.committed(tp);
                let high_watermark = p.high_watermark();
                let from = committed.unwrap_or_else(|| p.log_start());
                Ok(PartitionLag {
                    partition: tp.clone(),
                    committed,
                    high_watermark,
                    lag: (high_watermark - from).max(0),
                })
            })
            .collect()
    }

    async fn close(mut self) -> Result<()> {
        let result = self.commit().await;
        self.group.leave(self.member);
        self.left = true;
        self.log.bump();
        result
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        // Dropped without close: commit what was stored (it was processed), as the Kafka
        // consumer does, then leave; whatever was taken but not stored is read again.
        if !self.left {
            if let Err(e) = self.group.commit(self.member, &self.stored_offsets()) {
                tracing::warn!(error = %e, "commit on drop failed; stored offsets will be re-read");
            }
            self.group.leave(self.member);
            self.log.bump();
        }
    }
}
