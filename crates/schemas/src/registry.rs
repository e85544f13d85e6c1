//! The schema registry: Sluice's own (in process, persisted in its data directory) and a client
//! for any Confluent-compatible one, behind one [`SchemaSource`] trait.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_schema_by_id, get_schema_by_subject_and_version, post_schema,
};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use serde::{Deserialize, Serialize};

use crate::compat::Compatibility;
use crate::dir::SchemaDir;
use crate::{Error, Result};

/// One version of a subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectVersion {
    /// The subject, e.g. `sensor.reading`.
    pub subject: String,
    /// 1-based version within the subject.
    pub version: u32,
    /// Registry-wide schema id, the one in the wire format.
    pub id: u32,
    /// The schema text as registered.
    pub schema: String,
}

/// Where schemas come from: the operations every Sluice component needs of a registry.
pub trait SchemaSource: Send + Sync {
    /// The schema text with registry id `id`.
    fn schema_by_id(&self, id: u32) -> impl Future<Output = Result<String>> + Send;
    /// The latest version of `subject`.
    fn latest(&self, subject: &str) -> impl Future<Output = Result<SubjectVersion>> + Send;
    /// Registers `schema` under `subject` (or finds it there) and returns its id.
    fn register_schema(
        &self,
        subject: &str,
        schema: &str,
    ) -> impl Future<Output = Result<u32>> + Send;
}

macro_rules! forward_source {
    ($($ty:ty),*) => {$(
        impl<T: SchemaSource + ?Sized> SchemaSource for $ty {
            fn schema_by_id(&self, id: u32) -> impl Future<Output = Result<String>> + Send {
                (**self).schema_by_id(id)
            }
            fn latest(&self, subject: &str) -> impl Future<Output = Result<SubjectVersion>> + Send {
                (**self).latest(subject)
            }
            fn register_schema(&self, subject: &str, schema: &str) -> impl Future<Output = Result<u32>> + Send {
                (**self).register_schema(subject, schema)
            }
        }
    )*};
}
forward_source!(&T, std::sync::Arc<T>);

/// Which version of a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    /// The newest.
    Latest,
    /// A 1-based version number.
    Number(u32),
}

/// What the registry keeps, and writes to `registry.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    /// Level for subjects without their own.
    default_compatibility: Compatibility,
    /// Schema texts by id; ids are never reused.
    schemas: BTreeMap<u32, String>,
    subjects: BTreeMap<String, SubjectState>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compatibility: Option<Compatibility>,
    /// Schema ids, version 1 first.
    versions: Vec<u32>,
}

/// Sluice's own schema registry. Ids and versions are persisted in `<data dir>/registry.json`
/// (written to a temporary file, synced and renamed over the old one) before any call returns,
/// so an id handed out survives a crash and is never reused for another schema.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    file: Option<PathBuf>,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Schema id by normalized JSON text. Normalizing the JSON (parsed and re-printed, so key
    /// order and whitespace do not matter) keeps defaults and docs, unlike Avro's canonical form,
    /// which would make a schema that adds a default look identical to one without.
    by_text: HashMap<String, u32>,
}

impl Inner {
    fn new(state: State) -> Result<Self> {
        let mut by_text = HashMap::new();
        for (id, text) in &state.schemas {
            by_text.insert(normalize(text)?, *id);
        }
        Ok(Self { state, by_text })
    }
}

/// Parsed and re-printed schema JSON: object keys sorted, no whitespace.
fn normalize(text: &str) -> Result<String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::InvalidSchema(format!("not JSON: {e}")))?;
    Ok(value.to_string())
}

fn parse(text: &str) -> Result<Schema> {
    Schema::parse_str(text).map_err(|e| Error::InvalidSchema(e.to_string()))
}

impl Registry {
    /// A registry that keeps nothing after the process ends (tests, dry runs).
    pub fn in_memory() -> Self {
        Self {
            inner: Mutex::new(Inner {
                state: State::default(),
                by_text: HashMap::new(),
            }),
            file: None,
        }
    }

    /// Opens (or creates) the registry persisted in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|source| Error::Storage {
            path: dir.to_owned(),
            source,
        })?;
        let file = dir.join("registry.json");
        let state = match fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
                path: file.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(Error::Storage { path: file, source }),
        };
        Ok(Self {
            inner: Mutex::new(Inner::new(state)?),
            file: Some(file),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // State is only replaced whole after a successful write, so a panic elsewhere cannot
        // leave it half-changed.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `change` to a copy of the state, persists the copy, and only then makes it the
    /// registry's state: a failed write changes nothing.
    fn mutate<T>(&self, change: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let mut inner = self.lock();
        let mut next = Inner {
            state: inner.state.clone(),
            by_text: inner.by_text.clone(),
        };
        let out = change(&mut next)?;
        if let Some(file) = &self.file {
            persist(file, &next.state)?;
        }
        *inner = next;
        Ok(out)
    }

    /// Registers `schema` under `subject`, checking it against the subject's earlier versions
    /// under its compatibility level. Registering a schema the subject already has returns its
    /// existing version.
    pub fn register(&self, subject: &str, schema: &str) -> Result<SubjectVersion> {
        check_subject_name(subject)?;
        let parsed = parse(schema)?;
        let key = normalize(schema)?;
        if let Some(found) = self.lookup_key(subject, &key) {
            return Ok(found);
        }
        self.mutate(|inner| {
            let level = inner
                .state
                .subjects
                .get(subject)
                .and_then(|s| s.compatibility)
                .unwrap_or(inner.state.default_compatibility);
            let earlier = earlier_schemas(&inner.state, subject)?;
            let violations = level.check(&parsed, &earlier);
            if !violations.is_empty() {
                return Err(Error::Incompatible {
                    subject: subject.to_owned(),
                    level,
                    violations: violations.iter().map(ToString::to_string).collect(),
                });
            }
            let id = match inner.by_text.get(&key) {
                Some(id) => *id,
                None => {
                    let id = inner
                        .state
                        .schemas
                        .keys()
                        .next_back()
                        .map_or(1, |last| last + 1);
                    inner.state.schemas.insert(id, schema.to_owned());
                    inner.by_text.insert(key, id);
                    id
                }
            };
            let entry = inner.state.subjects.entry(subject.to_owned()).or_default();
            // A concurrent registration of the same schema may have won the race.
            let version = match entry.versions.iter().position(|v| *v == id) {
                Some(index) => index + 1,
                None => {
                    entry.versions.push(id);
                    entry.versions.len()
                }
            };
            Ok(SubjectVersion {
                subject: subject.to_owned(),
                version: version as u32,
                id,
                schema: schema.to_owned(),
            })
        })
    }

    fn lookup_key(&self, subject: &str, key: &str) -> Option<SubjectVersion> {
        let inner = self.lock();
        let id = *inner.by_text.get(key)?;
        let versions = &inner.state.subjects.get(subject)?.versions;
        let index = versions.iter().position(|v| *v == id)?;
        Some(SubjectVersion {
            subject: subject.to_owned(),
            version: index as u32 + 1,
            id,
            schema: inner.state.schemas.get(&id)?.clone(),
        })
    }

    /// The version of `subject` holding `schema`, if it was registered there.
    pub fn lookup(&self, subject: &str, schema: &str) -> Result<SubjectVersion> {
        parse(schema)?;
        let key = normalize(schema)?;
        if !self.lock().state.subjects.contains_key(subject) {
            return Err(Error::SubjectNotFound(subject.to_owned()));
        }
        self.lookup_key(subject, &key)
            .ok_or_else(|| Error::SchemaNotInSubject(subject.to_owned()))
    }

    /// One version of a subject.
    pub fn version(&self, subject: &str, version: VersionRef) -> Result<SubjectVersion> {
        let inner = self.lock();
        let versions = &inner
            .state
            .subjects
            .get(subject)
            .ok_or_else(|| Error::SubjectNotFound(subject.to_owned()))?
            .versions;
        let number = match version {
            VersionRef::Latest => versions.len() as u32,
            VersionRef::Number(n) => n,
        };
        let id = number
            .checked_sub(1)
            .and_then(|i| versions.get(i as usize))
            .ok_or_else(|| Error::VersionNotFound {
                subject: subject.to_owned(),
                version: number,
            })?;
        Ok(SubjectVersion {
            subject: subject.to_owned(),
            version: number,
            id: *id,
            schema: inner.state.schemas[id].clone(),
        })
    }

    /// The schema text with id `id`.
    pub fn schema(&self, id: u32) -> Result<String> {
        self.lock()
            .state
            .schemas
            .get(&id)
            .cloned()
            .ok_or(Error::SchemaNotFound(id))
    }

    /// Every subject, sorted.
    pub fn subjects(&self) -> Vec<String> {
        self.lock().state.subjects.keys().cloned().collect()
    }

    /// The version numbers of `subject`.
    pub fn versions(&self, subject: &str) -> Result<Vec<u32>> {
        let inner = self.lock();
        let s = inner
            .state
            .subjects
            .get(subject)
            .ok_or_else(|| Error::SubjectNotFound(subject.to_owned()))?;
        Ok((1..=s.versions.len() as u32).collect())
    }

    /// Whether `schema` could be registered under `subject`: the violations against the
    /// subject's latest version only (`latest_only`) or against every version its level checks.
    pub fn check(&self, subject: &str, schema: &str, latest_only: bool) -> Result<Vec<String>> {
        let parsed = parse(schema)?;
        let inner = self.lock();
        let level = self.compatibility_of(&inner.state, Some(subject));
        let mut earlier = earlier_schemas(&inner.state, subject)?;
        if latest_only && earlier.len() > 1 {
            earlier.drain(..earlier.len() - 1);
        }
        Ok(level
            .check(&parsed, &earlier)
            .iter()
            .map(ToString::to_string)
            .collect())
    }

    fn compatibility_of(&self, state: &State, subject: Option<&str>) -> Compatibility {
        subject
            .and_then(|s| state.subjects.get(s))
            .and_then(|s| s.compatibility)
            .unwrap_or(state.default_compatibility)
    }

    /// The level in force for `subject` (its own, else the default), or the default for `None`.
    pub fn compatibility(&self, subject: Option<&str>) -> Compatibility {
        self.compatibility_of(&self.lock().state, subject)
    }

    /// Sets the level of `subject`, or the default for `None`.
    pub fn set_compatibility(&self, subject: Option<&str>, level: Compatibility) -> Result<()> {
        if let Some(s) = subject {
            check_subject_name(s)?;
        }
        self.mutate(|inner| {
            match subject {
                Some(s) => {
                    inner
                        .state
                        .subjects
                        .entry(s.to_owned())
                        .or_default()
                        .compatibility = Some(level)
                }
                None => inner.state.default_compatibility = level,
            }
            Ok(())
        })
    }

    /// Registers every version of every subject in `dir`, in order, with the subject's level.
    /// Versions already registered are found, not added again. Returns how many were new.
    pub fn register_dir(&self, dir: &SchemaDir) -> Result<usize> {
        let mut added = 0;
        for subject in dir.subjects() {
            if self.compatibility(Some(&subject.name)) != subject.compatibility {
                self.set_compatibility(Some(&subject.name), subject.compatibility)?;
            }
            let before = self.versions(&subject.name).map_or(0, |v| v.len());
            for version in &subject.versions {
                self.register(&subject.name, &version.text)?;
            }
            added += self.versions(&subject.name)?.len() - before;
        }
        Ok(added)
    }
}

fn earlier_schemas(state: &State, subject: &str) -> Result<Vec<Schema>> {
    state
        .subjects
        .get(subject)
        .map(|s| {
            s.versions
                .iter()
                .map(|id| parse(&state.schemas[id]))
                .collect()
        })
        .unwrap_or_else(|| Ok(Vec::new()))
}

fn check_subject_name(subject: &str) -> Result<()> {
    if subject.is_empty() || subject.len() > 255 || subject.chars().any(char::is_control) {
        return Err(Error::InvalidSubject(subject.to_owned()));
    }
    Ok(())
}

fn persist(file: &Path, state: &State) -> Result<()> {
    let storage = |source| Error::Storage {
        path: file.to_owned(),
        source,
    };
    let tmp = file.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::Corrupt {
        path: file.to_owned(),
        message: e.to_string(),
    })?;
    let mut f = fs::File::create(&tmp).map_err(storage)?;
    f.write_all(&bytes).map_err(storage)?;
    f.sync_all().map_err(storage)?;
    fs::rename(&tmp, file).map_err(storage)?;
    // The rename is durable only once the directory entry is.
    if let Some(dir) = file.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(storage)?;
    }
    Ok(())
}

impl SchemaSource for Registry {
    async fn schema_by_id(&self, id: u32) -> Result<String> {
        self.schema(id)
    }
    async fn latest(&self, subject: &str) -> Result<SubjectVersion> {
        self.version(subject, VersionRef::Latest)
    }
    async fn register_schema(&self, subject: &str, schema: &str) -> Result<u32> {
        self.register(subject, schema).map(|v| v.id)
    }
}

/// A client for any Confluent-compatible registry (Confluent, Karapace, Apicurio, or
/// `sluice registry serve`), through `schema_registry_converter`.
#[derive(Debug)]
pub struct HttpRegistry {
    settings: SrSettings,
}

impl HttpRegistry {
    /// A client for the registry at `url` (e.g. `http://127.0.0.1:8081`).
    pub fn new(url: &str) -> Result<Self> {
        let settings = SrSettings::new_builder(url.trim_end_matches('/').to_owned())
            .no_proxy()
            .set_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Remote(e.to_string()))?;
        Ok(Self { settings })
    }
}

fn remote(e: schema_registry_converter::error::SRCError) -> Error {
    match e.cause {
        Some(cause) => Error::Remote(format!("{}: {cause}", e.error)),
        None => Error::Remote(e.error),
    }
}

impl SchemaSource for HttpRegistry {
    async fn schema_by_id(&self, id: u32) -> Result<String> {
        get_schema_by_id(id, &self.settings)
            .await
            .map(|s| s.schema)
            .map_err(remote)
    }

    async fn latest(&self, subject: &str) -> Result<SubjectVersion> {
        let s = get_schema_by_subject_and_version(&self.settings, subject, None)
            .await
            .map_err(remote)?;
        Ok(SubjectVersion {
            subject: subject.to_owned(),
            version: s.version.unwrap_or_default(),
            id: s.id,
            schema: s.schema,
        })
    }

    async fn register_schema(&self, subject: &str, schema: &str) -> Result<u32> {
        // The text goes as written: a canonical form would drop defaults and docs.
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_owned());
        post_schema(&self.settings, subject.to_owned(), supplied)
            .await
            .map(|s| s.id)
            .map_err(remote)
    }
}

/// The registry a process was pointed at: its own (a schemas folder, or `sluice dev`'s) or a
/// remote one. Lets a component take either without being generic over it.
#[derive(Debug, Clone)]
pub enum AnySchemas {
    /// A registry in this process.
    Local(Arc<Registry>),
    /// A Confluent-compatible registry over HTTP.
    Remote(Arc<HttpRegistry>),
}

impl SchemaSource for AnySchemas {
    async fn schema_by_id(&self, id: u32) -> Result<String> {
        match self {
            AnySchemas::Local(r) => r.schema_by_id(id).await,
            AnySchemas::Remote(r) => r.schema_by_id(id).await,
        }
    }
    async fn latest(&self, subject: &str) -> Result<SubjectVersion> {
        match self {
            AnySchemas::Local(r) => r.latest(subject).await,
            AnySchemas::Remote(r) => r.latest(subject).await,
        }
    }
    async fn register_schema(&self, subject: &str, schema: &str) -> Result<u32> {
        match self {
            AnySchemas::Local(r) => r.register_schema(subject, schema).await,
            AnySchemas::Remote(r) => r.register_schema(subject, schema).await,
        }
    }
}
