//! ONNX models: finding ONNX Runtime, loading a model version with its metadata, scoring rows.
//!
//! ONNX Runtime is loaded at run time (`ort`'s `load-dynamic`), from `ORT_DYLIB_PATH` or the
//! cache folder `scripts/fetch-onnxruntime` fills, so Sluice builds and runs without it and
//! scores with the statistical fallback until it is there.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use ort::session::Session;
use ort::value::TensorRef;
use serde::Deserialize;

use crate::features::FeatureParams;

/// The ONNX Runtime release `scripts/fetch-onnxruntime` installs and `ort` is built for.
pub const ORT_VERSION: &str = "1.31.1";

/// Why a model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// ONNX Runtime is missing or unusable.
    #[error("{0}")]
    Runtime(String),
    /// The model folder, file or metadata is missing or wrong.
    #[error("{0}")]
    Invalid(String),
    /// ONNX Runtime refused to run the model.
    #[error("scoring failed: {0}")]
    Scoring(String),
}

/// The folder ONNX Runtime is looked for in after `ORT_DYLIB_PATH`: `SLUICE_ORT_DIR`, else
/// `$XDG_CACHE_HOME/sluice/onnxruntime/<version>`, else `~/.cache/sluice/onnxruntime/<version>`.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SLUICE_ORT_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("sluice").join("onnxruntime").join(ORT_VERSION)
}

/// Where ONNX Runtime would be loaded from.
pub fn runtime_library() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => runtime_dir().join(format!(
            "{}onnxruntime{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        )),
    }
}

static RUNTIME: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process, from `library` or else [`runtime_library`]; later
/// calls return the first outcome, whatever they pass.
pub fn runtime(
    library: Option<&Path>,
) -> Result<&'static ort::environment::Environment, ModelError> {
    RUNTIME
        .get_or_init(|| {
            let path = library.map_or_else(runtime_library, Path::to_path_buf);
            if !path.exists() {
                return Err(format!(
                    "ONNX Runtime is not at {}; run scripts/fetch-onnxruntime, or set \
                     ORT_DYLIB_PATH to a libonnxruntime {ORT_VERSION}",
                    path.display()
                ));
            }
            let builder = ort::init_from(&path).map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {}: {e}; run scripts/fetch-onnxruntime for \
                     release {ORT_VERSION}",
                    path.display()
                )
            })?;
            builder
                .with_name("sluice")
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| ModelError::Runtime(e.clone()))
}

/// A model version's `metadata.json`, as `models/train_anomaly.py` writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    /// Model name, recorded in every result.
    pub name: String,
    /// Version, recorded in every result; the folder name.
    pub version: String,
    /// Input tensor name (`[N, features]`, f32).
    pub input: String,
    /// Output tensor name (one score per row).
    pub output: String,
    /// Feature names, in input order.
    pub features: Vec<String>,
    /// How the features are computed.
    pub feature_params: FeatureParams,
    /// Score at or above which a reading is an anomaly.
    pub threshold: f64,
    /// Rows and the scores sklearn gave them, to check a runtime against.
    #[serde(default)]
    pub reference: Option<Reference>,
    /// One device's readings and the features the training code computed for them.
    #[serde(default)]
    pub feature_reference: Option<FeatureReference>,
}

/// Reference scores from the training library.
#[derive(Debug, Clone, Deserialize)]
pub struct Reference {
    /// Feature rows.
    pub rows: Vec<Vec<f32>>,
    /// The score of each row.
    pub scores: Vec<f64>,
}

/// Reference features from the training code.
#[derive(Debug, Clone, Deserialize)]
pub struct FeatureReference {
    /// Readings of one device, in order, as `[temperature_c, humidity_pct, vibration_mm_s]`.
    pub readings: Vec<Vec<Option<f64>>>,
    /// The feature row of each.
    pub features: Vec<Vec<f32>>,
}

/// A loaded model version.
#[derive(Debug)]
pub struct OnnxModel {
    /// Its metadata.
    pub metadata: Metadata,
    /// The folder it was loaded from.
    pub dir: PathBuf,
    /// When `model.onnx` was last modified, to notice a version rewritten in place.
    pub modified: Option<SystemTime>,
    session: Mutex<Session>,
}

impl OnnxModel {
    /// Loads `dir/model.onnx` and `dir/metadata.json`, with ONNX Runtime from `library` (see
    /// [`runtime`]). Blocks (reads and optimises the graph).
    pub fn load(dir: &Path, library: Option<&Path>) -> Result<OnnxModel, ModelError> {
        let meta_path = dir.join("metadata.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| {
            ModelError::Invalid(format!("cannot read {}: {e}", meta_path.display()))
        })?;
        let metadata: Metadata = serde_json::from_str(&text)
            .map_err(|e| ModelError::Invalid(format!("{}: {e}", meta_path.display())))?;
        let expected = crate::features::names();
        if metadata.features != expected {
            return Err(ModelError::Invalid(format!(
                "{} lists features {:?}; this inferencer computes {:?}",
                meta_path.display(),
                metadata.features,
                expected
            )));
        }
        if !metadata.threshold.is_finite() {
            return Err(ModelError::Invalid(format!(
                "{}: threshold must be a number",
                meta_path.display()
            )));
        }
        let env = runtime(library)?;
        let model_path = dir.join("model.onnx");
        let modified = std::fs::metadata(&model_path)
            .and_then(|m| m.modified())
            .ok();
        let onnx = |e: ort::Error| {
            ModelError::Invalid(format!("cannot load {}: {e}", model_path.display()))
        };
        // One thread: the inferencer is one task per partition set, and the host is small.
        let session = Session::builder(env)
            .map_err(onnx)?
            .with_intra_threads(1)
            .map_err(|e| onnx(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| onnx(e.into()))?
            .commit_from_file(&model_path)
            .map_err(onnx)?;
        let has = |names: Vec<&str>, want: &str| names.contains(&want);
        if !has(
            session.inputs().iter().map(|i| i.name()).collect(),
            &metadata.input,
        ) || !has(
            session.outputs().iter().map(|o| o.name()).collect(),
            &metadata.output,
        ) {
            return Err(ModelError::Invalid(format!(
                "{} has no input {:?} or no output {:?}",
                model_path.display(),
                metadata.input,
                metadata.output
            )));
        }
        Ok(OnnxModel {
            metadata,
            dir: dir.to_owned(),
            modified,
            session: Mutex::new(session),
        })
    }

    /// Scores `rows` (row-major, [`Metadata::features`] wide): one score per row.
    pub fn score(&self, rows: &[f32]) -> Result<Vec<f32>, ModelError> {
        let width = self.metadata.features.len();
        let n = rows.len() / width;
        let err = |e: ort::Error| ModelError::Scoring(e.to_string());
        let input = TensorRef::from_array_view(([n, width], rows)).map_err(err)?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session
            .run(ort::inputs![self.metadata.input.as_str() => input])
            .map_err(err)?;
        let (_, scores) = outputs[self.metadata.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(err)?;
        if scores.len() != n {
            return Err(ModelError::Scoring(format!(
                "{} scores for {n} rows",
                scores.len()
            )));
        }
        Ok(scores.to_vec())
    }
}

/// The version folder to run: `version` itself, or for `latest` the highest version (by
/// number when the names are numbers) that has a `model.onnx`.
pub fn resolve(path: &Path, version: &str) -> Result<PathBuf, ModelError> {
    if version != "latest" {
        let dir = path.join(version);
        return if dir.join("model.onnx").is_file() {
            Ok(dir)
        } else {
            Err(ModelError::Invalid(format!(
                "no model.onnx in {}",
                dir.display()
            )))
        };
    }
    let entries = std::fs::read_dir(path).map_err(|e| {
        ModelError::Invalid(format!(
            "cannot read the model folder {}: {e}",
            path.display()
        ))
    })?;
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("model.onnx").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .max_by_key(|name| (name.parse::<u64>().ok(), name.clone()))
        .map(|name| path.join(name))
        .ok_or_else(|| {
            ModelError::Invalid(format!(
                "no version folder with a model.onnx in {}",
                path.display()
            ))
        })
}
