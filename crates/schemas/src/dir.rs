//! The schemas folder: `schemas/<subject>/<version>.avsc`, every version kept, and an optional
//! `schemas/<subject>/subject.json` (`{"compatibility": "FULL"}`) when a subject needs a rule
//! other than BACKWARD.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use apache_avro::Schema;
use serde::Deserialize;
use sluice_core::EventType;

use crate::compat::Compatibility;

/// Fields every Sluice event schema carries, around its payload.
pub const ENVELOPE_FIELDS: [&str; 7] = [
    "event_id",
    "event_type",
    "aggregate_id",
    "occurred_at",
    "ingested_at",
    "metadata",
    "payload",
];

/// One problem found in a schemas folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file or folder at fault.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

/// A loaded schemas folder.
#[derive(Debug, Clone)]
pub struct SchemaDir {
    root: PathBuf,
    subjects: Vec<DirSubject>,
}

/// One subject of the folder.
#[derive(Debug, Clone)]
pub struct DirSubject {
    /// The subject (and event type), e.g. `sensor.reading`.
    pub name: String,
    /// Its evolution rule.
    pub compatibility: Compatibility,
    /// Versions 1..=n, in order.
    pub versions: Vec<DirVersion>,
}

/// One schema file.
#[derive(Debug, Clone)]
pub struct DirVersion {
    /// The version number, from the file name.
    pub version: u32,
    /// The file.
    pub path: PathBuf,
    /// The text as written (registered as is, defaults and docs included).
    pub text: String,
    /// The parsed schema.
    pub schema: Schema,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectFile {
    /// The subject's compatibility level.
    compatibility: Compatibility,
}

impl SchemaDir {
    /// Loads every subject under `root`. Reports every problem at once: unreadable or
    /// unparsable files, bad file names, missing versions.
    pub fn load(root: &Path) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let problem = |path: &Path, message: String| Problem {
            path: path.to_owned(),
            message,
        };
        let entries = fs::read_dir(root).map_err(|e| {
            vec![problem(
                root,
                format!("cannot read the schemas folder: {e}"),
            )]
        })?;
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        let mut subjects = Vec::new();
        for dir in dirs {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Err(e) = EventType::new(name.as_str()) {
                problems.push(problem(&dir, format!("subject name: {e}")));
                continue;
            }
            match load_subject(&dir, name) {
                Ok(s) => subjects.push(s),
                Err(mut p) => problems.append(&mut p),
            }
        }
        if subjects.is_empty() && problems.is_empty() {
            problems.push(problem(
                root,
                "no subjects (expected <subject>/<version>.avsc)".into(),
            ));
        }
        if problems.is_empty() {
            Ok(Self {
                root: root.to_owned(),
                subjects,
            })
        } else {
            Err(problems)
        }
    }

    /// The folder this was loaded from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Subjects, sorted by name.
    pub fn subjects(&self) -> &[DirSubject] {
        &self.subjects
    }

    /// The subject names.
    pub fn subject_names(&self) -> BTreeSet<String> {
        self.subjects.iter().map(|s| s.name.clone()).collect()
    }

    /// The subject named `name`.
    pub fn subject(&self, name: &str) -> Option<&DirSubject> {
        self.subjects.iter().find(|s| s.name == name)
    }

    /// Checks every version of every subject against its predecessors under the subject's rule,
    /// and that every version is an event record with the envelope fields. Empty means all good.
    pub fn check(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for subject in &self.subjects {
            let schemas: Vec<Schema> = subject.versions.iter().map(|v| v.schema.clone()).collect();
            for (i, version) in subject.versions.iter().enumerate() {
                if let Some(missing) = missing_envelope_field(&version.schema) {
                    problems.push(Problem {
                        path: version.path.clone(),
                        message: format!(
                            "{} v{} is not an event record: {missing}",
                            subject.name, version.version
                        ),
                    });
                }
                for violation in subject.compatibility.check(&version.schema, &schemas[..i]) {
                    problems.push(Problem {
                        path: version.path.clone(),
                        message: format!(
                            "{} v{} breaks {}: {violation}",
                            subject.name, version.version, subject.compatibility
                        ),
                    });
                }
            }
        }
        problems
    }
}

fn missing_envelope_field(schema: &Schema) -> Option<String> {
    let Schema::Record(record) = schema else {
        return Some("the top level is not a record".into());
    };
    ENVELOPE_FIELDS
        .iter()
        .find(|f| !record.lookup.contains_key(**f))
        .map(|f| format!("missing envelope field `{f}`"))
}

fn load_subject(dir: &Path, name: String) -> Result<DirSubject, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut compatibility = Compatibility::default();
    let mut versions = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return Err(vec![Problem {
                path: dir.to_owned(),
                message: format!("cannot read: {e}"),
            }]);
        }
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut fail = |message: String| {
            problems.push(Problem {
                path: path.clone(),
                message,
            })
        };
        if file_name == "subject.json" {
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<SubjectFile>(&b).map_err(|e| e.to_string()))
            {
                Ok(f) => compatibility = f.compatibility,
                Err(e) => fail(format!("invalid subject.json: {e}")),
            }
            continue;
        }
        let Some(stem) = file_name.strip_suffix(".avsc") else {
            fail("unexpected file: expected <version>.avsc or subject.json".into());
            continue;
        };
        let version = match stem.parse::<u32>() {
            Ok(v) if v >= 1 && stem == v.to_string() => v,
            _ => {
                fail(format!(
                    "file name {file_name:?} is not <version>.avsc with version >= 1"
                ));
                continue;
            }
        };
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                fail(format!("cannot read: {e}"));
                continue;
            }
        };
        match Schema::parse_str(&text) {
            Ok(schema) => versions.push(DirVersion {
                version,
                path: path.clone(),
                text,
                schema,
            }),
            Err(e) => fail(format!("invalid Avro schema: {e}")),
        }
    }
    versions.sort_by_key(|v| v.version);
    for (i, v) in versions.iter().enumerate() {
        if v.version != i as u32 + 1 {
            problems.push(Problem {
                path: dir.to_owned(),
                message: format!(
                    "versions must run 1, 2, 3…: version {} is missing (every version is kept)",
                    i + 1
                ),
            });
            break;
        }
    }
    if versions.is_empty() && problems.is_empty() {
        problems.push(Problem {
            path: dir.to_owned(),
            message: "no versions (expected 1.avsc)".into(),
        });
    }
    if problems.is_empty() {
        Ok(DirSubject {
            name,
            compatibility,
            versions,
        })
    } else {
        Err(problems)
    }
}
