//! One partition of the embedded log: a folder of segment files, each named by the offset of
//! its first record and holding length-prefixed, CRC-checked records.
//!
//! A record frame is `len u32 | crc32 u32 | offset i64 | timestamp i64 | key_len i32 | key |
//! header_count u32 | (klen u32, key, vlen u32, value)* | value_len u32 | value`, integers
//! little-endian, `len` counting what follows it and the CRC covering what follows the CRC.
//! After a crash the newest segment is cut at its first incomplete or corrupt frame, so a torn
//! write of an unacknowledged batch disappears and everything acknowledged stays.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::fsutil::{io, sync_dir};
use crate::{Error, Header, Message, Offset, Partition, Record, Result};

/// Largest frame accepted: bounds memory when reading a corrupt length.
pub(crate) const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Bytes read per file access when scanning forward.
const READ_CHUNK: usize = 256 * 1024;
/// A sparse index entry every this many bytes of a segment.
const INDEX_EVERY: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub base: Offset,
    pub path: PathBuf,
    pub size: u64,
    /// One past the last offset in the segment (== base when empty).
    pub end: Offset,
    pub max_timestamp: i64,
    /// (offset, byte position) every INDEX_EVERY bytes, first entry at position 0.
    pub index: Vec<(Offset, u64)>,
}

impl Segment {
    fn position_of(&self, offset: Offset) -> u64 {
        match self.index.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(i) => self.index[i].1,
            Err(0) => 0,
            Err(i) => self.index[i - 1].1,
        }
    }
}

/// A record with the timestamp it is stored under.
pub(crate) type Stamped = (Record, i64);

/// What the writer holds under its lock.
#[derive(Debug)]
struct Writer {
    segments: Vec<Segment>,
    active: File,
    next: Offset,
}

/// One partition on disk.
#[derive(Debug)]
pub(crate) struct PartitionLog {
    pub partition: Partition,
    dir: PathBuf,
    segment_bytes: u64,
    fsync: bool,
    writer: Mutex<Writer>,
    /// One past the last offset that is durable; readers see nothing beyond it.
    visible: AtomicI64,
}

/// A frame decoded from a buffer.
struct Frame {
    len: usize,
    message: Option<Message>,
    offset: Offset,
    timestamp: i64,
}

fn segment_name(base: Offset) -> String {
    format!("{base:020}.log")
}

pub(crate) fn encode(buf: &mut Vec<u8>, offset: Offset, ts: i64, record: &Record) -> Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 8]); // len + crc, filled below
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&ts.to_le_bytes());
    match &record.key {
        Some(k) => {
            buf.extend_from_slice(&(k.len() as i32).to_le_bytes());
            buf.extend_from_slice(k);
        }
        None => buf.extend_from_slice(&(-1i32).to_le_bytes()),
    }
    buf.extend_from_slice(&(record.headers.len() as u32).to_le_bytes());
    for h in &record.headers {
        buf.extend_from_slice(&(h.key.len() as u32).to_le_bytes());
        buf.extend_from_slice(h.key.as_bytes());
        buf.extend_from_slice(&(h.value.len() as u32).to_le_bytes());
        buf.extend_from_slice(&h.value);
    }
    buf.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
    buf.extend_from_slice(&record.value);
    let len = buf.len() - start - 4;
    if len > MAX_FRAME {
        buf.truncate(start);
        return Err(Error::TooLarge(format!(
            "a record of {len} bytes exceeds the embedded log's {MAX_FRAME}-byte frame limit"
        )));
    }
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes the frame at the start of `buf`. `Ok(None)` when `buf` holds only part of a frame;
/// `Err` when the bytes are not a valid frame. With `full == false` only the offset and the
/// timestamp are read.
fn decode(
    buf: &[u8],
    topic: &str,
    partition: Partition,
    full: bool,
) -> Result<Option<Frame>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(4 + 8 + 8 + 4 + 4 + 4..=MAX_FRAME).contains(&len) {
        return Err(format!("frame length {len} is out of range"));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let body = &buf[8..4 + len];
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if crc32fast::hash(body) != crc {
        return Err("CRC mismatch".into());
    }
    let mut r = Reader { buf: body, at: 0 };
    let offset = r.i64()?;
    let timestamp = r.i64()?;
    let message = if full {
        let key = match r.i32()? {
            -1 => None,
            n if n >= 0 => Some(r.bytes(n as usize)?.to_vec()),
            n => return Err(format!("key length {n}")),
        };
        let count = r.u32()? as usize;
        let mut headers = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let klen = r.u32()? as usize;
            let key = String::from_utf8(r.bytes(klen)?.to_vec()).map_err(|e| e.to_string())?;
            let vlen = r.u32()? as usize;
            headers.push(Header {
                key,
                value: r.bytes(vlen)?.to_vec(),
            });
        }
        let vlen = r.u32()? as usize;
        let value = r.bytes(vlen)?.to_vec();
        Some(Message {
            topic: topic.to_owned(),
            partition,
            offset,
            key,
            value,
            headers,
            timestamp_ms: timestamp,
        })
    } else {
        None
    };
    Ok(Some(Frame {
        len: 4 + len,
        message,
        offset,
        timestamp,
    }))
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or("field runs past the frame")?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(self.u32()? as i32)
    }
    fn i64(&mut self) -> Result<i64, String> {
        let b = self.bytes(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }
}

/// Scans a segment file: its end offset, max timestamp, sparse index, and the byte length of
/// its valid prefix (where a torn tail starts).
fn scan(path: &Path, base: Offset) -> Result<(Segment, u64)> {
    let file = File::open(path).map_err(io(path))?;
    let size = file.metadata().map_err(io(path))?.len();
    let mut seg = Segment {
        base,
        path: path.to_owned(),
        size: 0,
        end: base,
        max_timestamp: i64::MIN,
        index: Vec::new(),
    };
    let mut pos = 0u64;
    let mut buf = Vec::new();
    let mut last_indexed: Option<u64> = None;
    'outer: while pos < size {
        let want = READ_CHUNK.max(buf.len());
        buf.resize(want.min((size - pos) as usize), 0);
        file.read_exact_at(&mut buf, pos).map_err(io(path))?;
        let mut at = 0usize;
        loop {
            match decode(&buf[at..], "", 0, false) {
                Ok(Some(frame)) => {
                    let here = pos + at as u64;
                    if last_indexed.is_none_or(|l| here - l >= INDEX_EVERY) {
                        seg.index.push((frame.offset, here));
                        last_indexed = Some(here);
                    }
                    seg.end = frame.offset + 1;
                    seg.max_timestamp = seg.max_timestamp.max(frame.timestamp);
                    at += frame.len;
                }
                Ok(None) if at == 0 && (buf.len() as u64) < size - pos => {
                    // A frame larger than the chunk: read more.
                    let need = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize + 4;
                    buf.resize(need.min((size - pos) as usize), 0);
                    file.read_exact_at(&mut buf, pos).map_err(io(path))?;
                }
                Ok(None) if at == 0 => break 'outer,
                Ok(None) => break,
                Err(reason) => {
                    tracing::warn!(path = %path.display(), position = pos + at as u64, %reason, "cutting the embedded log at a corrupt frame");
                    pos += at as u64;
                    break 'outer;
                }
            }
        }
        pos += at as u64;
    }
    seg.size = pos;
    Ok((seg, pos))
}

impl PartitionLog {
    /// Opens the partition folder, recovering the newest segment after a crash.
    pub(crate) fn open(
        dir: &Path,
        partition: Partition,
        segment_bytes: u64,
        fsync: bool,
    ) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut bases: Vec<Offset> = fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        bases.sort_unstable();
        let mut segments = Vec::with_capacity(bases.len().max(1));
        for (i, base) in bases.iter().enumerate() {
            let path = dir.join(segment_name(*base));
            let (seg, valid) = scan(&path, *base)?;
            let last = i + 1 == bases.len();
            if last {
                let len = fs::metadata(&path).map_err(io(&path))?.len();
                if valid < len {
                    // The tail of an unacknowledged write: cut it so appends continue cleanly.
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io(&path))?;
                    f.set_len(valid).map_err(io(&path))?;
                    f.sync_all().map_err(io(&path))?;
                }
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            let path = dir.join(segment_name(0));
            File::create(&path).map_err(io(&path))?;
            sync_dir(dir)?;
            segments.push(Segment {
                base: 0,
                path,
                size: 0,
                end: 0,
                max_timestamp: i64::MIN,
                index: Vec::new(),
            });
        }
        let last = segments.last().expect("at least one segment");
        let next = last.end;
        let active = OpenOptions::new()
            .append(true)
            .open(&last.path)
            .map_err(io(&last.path))?;
        Ok(Self {
            partition,
            dir: dir.to_owned(),
            segment_bytes,
            fsync,
            writer: Mutex::new(Writer {
                segments,
                active,
                next,
            }),
            visible: AtomicI64::new(next),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One past the newest durable offset.
    pub(crate) fn high_watermark(&self) -> Offset {
        self.visible.load(Ordering::Acquire)
    }

    /// The oldest offset kept.
    pub(crate) fn log_start(&self) -> Offset {
        self.lock().segments.first().map_or(0, |s| s.base)
    }

    /// Appends records and makes them durable; returns the offset of the first.
    pub(crate) fn append(&self, records: &[Stamped]) -> Result<Offset> {
        let mut buf = Vec::with_capacity(records.iter().map(|(r, _)| r.value.len() + 64).sum());
        let (first, end, sync_handle) = {
            let mut w = self.lock();
            if w.segments
                .last()
                .is_some_and(|s| s.size >= self.segment_bytes)
            {
                self.roll(&mut w)?;
            }
            let first = w.next;
            let seg_pos = w.segments.last().map_or(0, |s| s.size);
            let mut index_adds = Vec::new();
            let mut last_index_pos = w
                .segments
                .last()
                .and_then(|s| s.index.last())
                .map(|(_, p)| *p);
            let mut max_ts = i64::MIN;
            for (i, (record, ts)) in records.iter().enumerate() {
                let pos = seg_pos + buf.len() as u64;
                if last_index_pos.is_none_or(|l| pos - l >= INDEX_EVERY) {
                    index_adds.push((first + i as i64, pos));
                    last_index_pos = Some(pos);
                }
                encode(&mut buf, first + i as i64, *ts, record)?;
                max_ts = max_ts.max(*ts);
            }
            let path = w
                .segments
                .last()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            if let Err(e) = w.active.write_all(&buf) {
                // Cut whatever part of the batch reached the file, so the next append starts
                // on a frame boundary.
                let _ = w.active.set_len(seg_pos);
                return Err(io(&path)(e));
            }
            let end = first + records.len() as i64;
            w.next = end;
            let seg = w.segments.last_mut().expect("active segment");
            seg.size += buf.len() as u64;
            seg.end = end;
            seg.max_timestamp = seg.max_timestamp.max(max_ts);
            seg.index.extend(index_adds);
            let handle = if self.fsync {
                Some(w.active.try_clone().map_err(io(&path))?)
            } else {
                None
            };
            (first, end, handle.map(|h| (h, path)))
        };
        // Fsync outside the lock so other producers can append meanwhile; one fsync covers
        // every write made to the file before it.
        if let Some((file, path)) = sync_handle {
            file.sync_data().map_err(io(&path))?;
        }
        self.visible.fetch_max(end, Ordering::AcqRel);
        Ok(first)
    }

    fn roll(&self, w: &mut Writer) -> Result<()> {
        let last = w
            .segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        w.active.sync_all().map_err(io(&last))?;
        let path = self.dir.join(segment_name(w.next));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        sync_dir(&self.dir)?;
        w.segments.push(Segment {
            base: w.next,
            path,
            size: 0,
            end: w.next,
            max_timestamp: i64::MIN,
            index: Vec::new(),
        });
        w.active = file;
        Ok(())
    }

    /// Reads up to `max` messages from `from`, never past the durable end. Returns the
    /// messages and the offset to read next (past the log start if `from` was deleted).
    pub(crate) fn read(
        &self,
        topic: &str,
        from: Offset,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Message>, Offset)> {
        let visible = self.high_watermark();
        let (segments, start) = {
            let w = self.lock();
            let start = w.segments.first().map_or(0, |s| s.base);
            let from = from.max(start);
            let i = w
                .segments
                .partition_point(|s| s.base <= from)
                .saturating_sub(1);
            (w.segments[i..].to_vec(), start)
        };
        let mut next = from.max(start);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for seg in segments {
            if next >= visible || out.len() >= max || bytes >= max_bytes {
                break;
            }
            if seg.end <= next {
                continue;
            }
            let file = match File::open(&seg.path) {
                Ok(f) => f,
                // Deleted by retention since we looked: continue with what remains.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&seg.path)(e)),
            };
            let mut pos = seg.position_of(next);
            let mut buf = vec![0u8; READ_CHUNK];
            'segment: while pos < seg.size && out.len() < max && next < visible {
                let n = (seg.size - pos).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], pos)
                    .map_err(io(&seg.path))?;
                let mut at = 0usize;
                loop {
                    match decode(&buf[at..n], topic, self.partition, true) {
                        Ok(Some(frame)) => {
                            at += frame.len;
                            if frame.offset >= visible {
                                break 'segment;
                            }
                            if frame.offset >= next {
                                next = frame.offset + 1;
                                if let Some(m) = frame.message {
                                    bytes += m.value.len();
                                    out.push(m);
                                }
                                if out.len() >= max || bytes >= max_bytes {
                                    break 'segment;
                                }
                            }
                        }
                        Ok(None) if at == 0 && n == buf.len() => {
                            // One frame larger than the buffer.
                            let need =
                                u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize + 4;
                            buf.resize(need, 0);
                            continue 'segment;
                        }
                        Ok(None) if at == 0 => break 'segment,
                        Ok(None) => break,
                        Err(reason) => {
                            return Err(Error::Fatal(format!(
                                "{}: corrupt frame at byte {}: {reason}",
                                seg.path.display(),
                                pos + at as u64
                            )));
                        }
                    }
                }
                pos += at as u64;
            }
        }
        Ok((out, next))
    }

    /// The first offset whose record has a timestamp at or after `ts` (the end if none).
    pub(crate) fn offset_for_time(&self, topic: &str, ts: i64) -> Result<Offset> {
        let (segments, end) = {
            let w = self.lock();
            (w.segments.clone(), self.high_watermark())
        };
        for seg in segments.iter().filter(|s| s.max_timestamp >= ts) {
            let mut from = seg.base;
            while from < seg.end.min(end) {
                let (batch, next) = self.read(topic, from, 1024, usize::MAX)?;
                if let Some(m) = batch.iter().find(|m| m.timestamp_ms >= ts) {
                    return Ok(m.offset);
                }
                if batch.is_empty() {
                    break;
                }
                from = next;
            }
        }
        Ok(end)
    }

    /// Deletes the oldest segments that fall outside the retention limits. The active segment
    /// is kept, so a partition never loses its newest records.
    pub(crate) fn enforce_retention(
        &self,
        max_age_cutoff: Option<i64>,
        max_bytes: Option<u64>,
    ) -> Result<usize> {
        let doomed: Vec<PathBuf> = {
            let mut w = self.lock();
            let mut total: u64 = w.segments.iter().map(|s| s.size).sum();
            let mut n = 0;
            while n + 1 < w.segments.len() {
                let s = &w.segments[n];
                let too_old = max_age_cutoff.is_some_and(|cut| s.max_timestamp < cut);
                let too_big = max_bytes.is_some_and(|max| total > max);
                if !(too_old || too_big) {
                    break;
                }
                total -= s.size;
                n += 1;
            }
            w.segments.drain(..n).map(|s| s.path).collect()
        };
        for path in &doomed {
            fs::remove_file(path).map_err(io(path))?;
        }
        if !doomed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(doomed.len())
    }
}
