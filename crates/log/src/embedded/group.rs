//! Consumer groups of the embedded log: membership, partition assignment and committed offsets.
//!
//! Every member of a group lives in this process, so the coordinator is a mutex. A partition
//! moves between members only when its old owner lets go of it: the owner commits its stored
//! offsets for it on its next poll, then the new owner claims it at the committed offset. A
//! member that leaves (closed or dropped) commits what it stored first; whatever it took but
//! did not store is read again by whoever takes its partitions.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::fsutil::{io, write_atomically};
use crate::{Error, Offset, Partition, Result, TopicPartition};

/// A member's id within its group.
pub(crate) type MemberId = u64;

#[derive(Debug, Default)]
struct State {
    committed: BTreeMap<TopicPartition, Offset>,
    /// Members and the partitions of the topics they subscribe to.
    members: BTreeMap<MemberId, Vec<TopicPartition>>,
    owners: HashMap<TopicPartition, MemberId>,
    target: HashMap<TopicPartition, MemberId>,
    next_member: MemberId,
}

impl State {
    /// Deals every subscribed partition to the members that subscribe to its topic, in turn.
    fn rebalance(&mut self) {
        self.target.clear();
        let mut all: Vec<&TopicPartition> = self.members.values().flatten().collect();
        all.sort();
        all.dedup();
        let mut turn: HashMap<&str, usize> = HashMap::new();
        for tp in all {
            let eligible: Vec<MemberId> = self
                .members
                .iter()
                .filter(|(_, parts)| parts.contains(tp))
                .map(|(id, _)| *id)
                .collect();
            let n = turn.entry(tp.topic.as_str()).or_default();
            self.target
                .insert(tp.clone(), eligible[*n % eligible.len()]);
            *n += 1;
        }
    }
}

#[derive(Serialize, Deserialize)]
struct OffsetsFile {
    offsets: Vec<CommittedOffset>,
}

#[derive(Serialize, Deserialize)]
struct CommittedOffset {
    topic: String,
    partition: Partition,
    offset: Offset,
}

/// What a member must do after [`Group::sync`].
#[derive(Debug, Default)]
pub(crate) struct Sync {
    /// Partitions it no longer owns.
    pub released: Vec<TopicPartition>,
    /// Partitions it now owns, with the offset to start from (committed, if any).
    pub claimed: Vec<(TopicPartition, Option<Offset>)>,
}

/// One consumer group.
#[derive(Debug)]
pub(crate) struct Group {
    file: PathBuf,
    state: Mutex<State>,
}

impl Group {
    /// Opens the group, reading its committed offsets.
    pub(crate) fn open(file: PathBuf) -> Result<Self> {
        let mut state = State::default();
        match fs::read(&file) {
            Ok(bytes) => {
                let saved: OffsetsFile = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Fatal(format!("{}: unreadable group offsets: {e}", file.display()))
                })?;
                for c in saved.offsets {
                    state
                        .committed
                        .insert(TopicPartition::new(&c.topic, c.partition), c.offset);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&file)(e)),
        }
        Ok(Self {
            file,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a member subscribed to `partitions`.
    pub(crate) fn join(&self, partitions: Vec<TopicPartition>) -> MemberId {
        let mut s = self.lock();
        let id = s.next_member;
        s.next_member += 1;
        s.members.insert(id, partitions);
        s.rebalance();
        id
    }

    /// Removes a member. Its partitions are free to be claimed at the committed offsets.
    pub(crate) fn leave(&self, member: MemberId) {
        let mut s = self.lock();
        s.members.remove(&member);
        s.owners.retain(|_, owner| *owner != member);
        s.rebalance();
    }

    /// Lets go of the partitions `member` should no longer own (committing `stored` for them
    /// first) and claims the free ones it should own.
    pub(crate) fn sync(
        &self,
        member: MemberId,
        stored: &HashMap<TopicPartition, Offset>,
    ) -> Result<Sync> {
        let mut s = self.lock();
        let mut out = Sync::default();
        let owned: Vec<TopicPartition> = s
            .owners
            .iter()
            .filter(|(_, o)| **o == member)
            .map(|(tp, _)| tp.clone())
            .collect();
        let mut to_commit = Vec::new();
        for tp in owned {
            if s.target.get(&tp) != Some(&member) {
                if let Some(next) = stored.get(&tp) {
                    to_commit.push((tp.clone(), *next));
                }
                out.released.push(tp);
            }
        }
        if !to_commit.is_empty() {
            let mut next = s.committed.clone();
            next.extend(to_commit);
            self.persist(&next)?;
            s.committed = next;
        }
        for tp in &out.released {
            s.owners.remove(tp);
        }
        let mine: Vec<TopicPartition> = s
            .target
            .iter()
            .filter(|(tp, t)| **t == member && !s.owners.contains_key(*tp))
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in mine {
            s.owners.insert(tp.clone(), member);
            let committed = s.committed.get(&tp).copied();
            out.claimed.push((tp, committed));
        }
        out.claimed.sort();
        Ok(out)
    }

    /// Commits offsets of partitions `member` owns, durably.
    pub(crate) fn commit(
        &self,
        member: MemberId,
        offsets: &[(TopicPartition, Offset)],
    ) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut s = self.lock();
        if let Some((tp, _)) = offsets
            .iter()
            .find(|(tp, _)| s.owners.get(tp) != Some(&member))
        {
            return Err(Error::NotAssigned(tp.clone()));
        }
        let mut next = s.committed.clone();
        let mut changed = false;
        for (tp, offset) in offsets {
            if next.get(tp) != Some(offset) {
                next.insert(tp.clone(), *offset);
                changed = true;
            }
        }
        if changed {
            self.persist(&next)?;
            s.committed = next;
        }
        Ok(())
    }

    /// The committed offset of a partition.
    pub(crate) fn committed(&self, tp: &TopicPartition) -> Option<Offset> {
        self.lock().committed.get(tp).copied()
    }

    /// Replaces the offsets file atomically.
    fn persist(&self, offsets: &BTreeMap<TopicPartition, Offset>) -> Result<()> {
        let body = OffsetsFile {
            offsets: offsets
                .iter()
                .map(|(tp, o)| CommittedOffset {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    offset: *o,
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| Error::Fatal(format!("cannot encode group offsets: {e}")))?;
        write_atomically(&self.file, &bytes)
    }
}

/// The file holding a group's offsets.
pub(crate) fn group_file(dir: &Path, group: &str) -> PathBuf {
    dir.join(format!("{group}.json"))
}
