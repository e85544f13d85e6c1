//! The schemas folder check: the repo's folder passes; an incompatible new version fails with a
//! message naming the subject, the version and the field.

use std::fs;
use std::path::PathBuf;

use serde_json::{Value, json};
use sluice_schemas::SchemaDir;

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas"))
}

/// A copy of the repo's device.status with a v2 that adds `site` to the payload.
fn folder_with_v2(site: Value, compatibility: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let subject = dir.path().join("device.status");
    fs::create_dir(&subject).unwrap();
    let v1 = fs::read_to_string(repo_root().join("device.status/1.avsc")).unwrap();
    fs::write(subject.join("1.avsc"), &v1).unwrap();
    let mut v2: Value = serde_json::from_str(&v1).unwrap();
    for field in v2["fields"].as_array_mut().unwrap() {
        if field["name"] == "payload" {
            field["type"]["fields"]
                .as_array_mut()
                .unwrap()
                .push(site.clone());
        }
    }
    fs::write(
        subject.join("2.avsc"),
        serde_json::to_string_pretty(&v2).unwrap(),
    )
    .unwrap();
    if let Some(level) = compatibility {
        fs::write(
            subject.join("subject.json"),
            json!({"compatibility": level}).to_string(),
        )
        .unwrap();
    }
    dir
}

#[test]
fn the_repo_schemas_pass() {
    let dir = SchemaDir::load(&repo_root()).unwrap();
    assert_eq!(dir.check(), vec![]);
    let names: Vec<_> = dir.subject_names().into_iter().collect();
    for subject in [
        "action.requested",
        "action.result",
        "device.status",
        "inference.result",
        "sensor.reading",
    ] {
        assert!(
            names.iter().any(|n| n == subject),
            "{subject} missing from {names:?}"
        );
    }
}

#[test]
fn a_new_field_without_default_fails_the_check() {
    let folder = folder_with_v2(json!({"name": "site", "type": "string"}), None);
    let problems = SchemaDir::load(folder.path()).unwrap().check();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let text = problems[0].to_string();
    assert!(text.contains("device.status v2 breaks BACKWARD"), "{text}");
    assert!(text.contains("payload.site"), "{text}");
    assert!(text.contains("2.avsc"), "{text}");
}

#[test]
fn a_new_field_with_default_passes_and_none_allows_anything() {
    let ok = folder_with_v2(
        json!({"name": "site", "type": ["null", "string"], "default": null}),
        None,
    );
    assert_eq!(SchemaDir::load(ok.path()).unwrap().check(), vec![]);
    let anything = folder_with_v2(json!({"name": "site", "type": "string"}), Some("NONE"));
    assert_eq!(SchemaDir::load(anything.path()).unwrap().check(), vec![]);
}

#[test]
fn forward_rule_from_subject_json_is_applied() {
    // Adding a required field is FORWARD-compatible (old readers ignore it)...
    let folder = folder_with_v2(json!({"name": "site", "type": "string"}), Some("FORWARD"));
    assert_eq!(SchemaDir::load(folder.path()).unwrap().check(), vec![]);
    // ...but not FULL.
    let folder = folder_with_v2(json!({"name": "site", "type": "string"}), Some("FULL"));
    assert_eq!(SchemaDir::load(folder.path()).unwrap().check().len(), 1);
}

#[test]
fn layout_mistakes_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let write = |p: &str, text: &str| {
        let path = dir.path().join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    };
    let v1 = fs::read_to_string(repo_root().join("device.status/1.avsc")).unwrap();
    write("device.status/1.avsc", &v1);
    write("device.status/3.avsc", &v1); // 2 is missing
    write("sensor.reading/1.avsc", "{not json");
    write("Bad Name/1.avsc", &v1);
    write("action.result/v1.avsc", &v1);
    let problems = SchemaDir::load(dir.path()).unwrap_err();
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 4, "{text:#?}");
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(has("version 2 is missing"), "{text:#?}");
    assert!(has("invalid Avro schema"), "{text:#?}");
    assert!(has("subject name"), "{text:#?}");
    assert!(has("v1.avsc"), "{text:#?}");
}
