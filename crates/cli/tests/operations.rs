//! The operator commands end to end, as an operator runs them against `sluice dev`: dead
//! letters re-driven after a config fix, replays whose side effects are suppressed, and a
//! projection rebuilt beside the live one while it keeps serving, resumed after a crash.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_mqtt_bridge::testing::publish_lines;
use sluice_store::{DlqFilter, DlqStatus, Resolution, Store, StoreOptions};
use uuid::Uuid;

mod common;
use common::{Dev, block_on, post, repo};

const DEADLINE: Duration = Duration::from_secs(90);

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE__STORE")
        .env_remove("SLUICE__LOG")
        .current_dir(repo())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn store_of(data: &Path) -> Store {
    let url = format!("sqlite://{}", data.join("sluice.db").display());
    block_on(Store::connect(&url, StoreOptions::default())).unwrap()
}

/// Polls `check` until it gives a value, failing after [`DEADLINE`] with what it last saw.
fn until<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(seen) => assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}: {seen}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `check` holds, reading the store from this process.
fn wait_for<T>(what: &str, data: &Path, check: impl Fn(&Store) -> Option<T>) -> T {
    let store = store_of(data);
    let v = until(what, || check(&store).ok_or_else(String::new));
    block_on(store.close());
    v
}

fn event_count(store: &Store) -> u64 {
    block_on(store.event_count()).unwrap()
}

fn dlq(store: &Store, status: Option<DlqStatus>) -> Vec<sluice_store::DlqEntry> {
    block_on(store.dlq_list(&DlqFilter {
        status,
        ..DlqFilter::default()
    }))
    .unwrap()
}

/// The default topology with a temperature range on the validator.
fn topology_with_max_temperature(dir: &Path, max: u32) -> PathBuf {
    let default = std::fs::read_to_string(repo().join("topologies/default.yaml")).unwrap();
    let strict = default.replacen(
        "      batch_size: 500\n",
        &format!(
            "      batch_size: 500\n      ranges: {{sensor.reading: {{temperature_c: {{min: -60, max: {max}}}}}}}\n"
        ),
        1,
    );
    assert_ne!(strict, default, "the validator's config block moved");
    let path = dir.join(format!("topology-max-{max}.yaml"));
    std::fs::write(&path, strict).unwrap();
    path
}

fn reading_lines(temperatures: &[f64]) -> Vec<String> {
    temperatures
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({
                "event_id": Uuid::new_v4().to_string(),
                "occurred_at": chrono::Utc::now().to_rfc3339(),
                "payload": {"seq": i, "temperature_c": t},
            })
            .to_string()
        })
        .collect()
}

/// Furnace readings above the validator's range land in the DLQ; the range is raised; `dlq
/// replay` re-drives them (refused while `sluice dev` holds the log, with the reason); they
/// reach the event store once; a second replay changes nothing; the history is audited and the
/// DLQ is a table of the SQL endpoint.
#[test]
fn dead_letters_are_redriven_after_a_config_fix_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let strict = topology_with_max_temperature(dir.path(), 100);
    let fixed = topology_with_max_temperature(dir.path(), 200);

    let dev = Dev::start(&data, &["--topology", strict.to_str().unwrap()]);
    let lines = reading_lines(&[21.0, 22.0, 130.0, 23.0, 140.0, 150.0, 24.0, 25.0]);
    publish_lines(dev.mqtt_port(), "devices/furnace-1/telemetry", &lines, None);
    wait_for("5 events and 3 dead letters", &data, |s| {
        (event_count(s) == 5 && dlq(s, None).len() == 3).then_some(())
    });
    let listed = sluice(&["dlq", "list", "--data-dir", d, "--json"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let rows: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter().all(|r| r["error_class"] == "out_of_range"),
        "{rows:?}"
    );
    let ids: Vec<String> = rows.iter().map(|r| r["dlq_id"].to_string()).collect();

    // The embedded log belongs to the running dev: a re-drive says so and changes nothing.
    let busy = sluice(&[
        "dlq",
        "replay",
        "--data-dir",
        d,
        "--processor",
        "ingest-validator",
    ]);
    assert!(!busy.status.success());
    assert!(text(&busy).contains("in use"), "{}", text(&busy));
    dev.stop();
    let store = store_of(&data);
    assert_eq!(dlq(&store, Some(DlqStatus::Pending)).len(), 3);
    block_on(store.close());

    let dry = sluice(&[
        "dlq",
        "replay",
        "--data-dir",
        d,
        "--processor",
        "ingest-validator",
        "--dry-run",
    ]);
    assert!(
        text(&dry).contains("would re-publish 3 dead letter(s): 3 to ingest.raw"),
        "{}",
        text(&dry)
    );
    let redrive = sluice(&[
        "dlq",
        "replay",
        "--data-dir",
        d,
        "--processor",
        "ingest-validator",
    ]);
    assert!(redrive.status.success(), "{}", text(&redrive));
    assert!(
        text(&redrive).contains("re-published 3 dead letter(s)"),
        "{}",
        text(&redrive)
    );

    // With the range raised, the validator takes them: 8 events, no new dead letter.
    let dev = Dev::start(&data, &["--topology", fixed.to_str().unwrap()]);
    wait_for("the re-driven readings in the store", &data, |s| {
        (event_count(s) == 8).then_some(())
    });
    let served = dev.sql("SELECT status, count(*) AS n FROM dlq GROUP BY status");
    assert!(served.contains("replayed,3"), "{served}");
    let discard = sluice(&[
        "dlq",
        "discard",
        "--data-dir",
        d,
        "--processor",
        "nobody",
        "--reason",
        "x",
    ]);
    assert!(text(&discard).contains("discarded 0"), "{}", text(&discard));
    dev.stop();

    // Again: every entry is replayed already; nothing is published, nothing changes.
    let mut again = vec!["dlq", "replay", "--data-dir", d];
    again.extend(ids.iter().map(String::as_str));
    let again = sluice(&again);
    assert!(
        !again.status.success(),
        "skipped entries are a failure to report"
    );
    assert!(text(&again).contains("is replayed"), "{}", text(&again));
    assert!(
        text(&again).contains("nothing to re-publish"),
        "{}",
        text(&again)
    );
    // A marker on the furnace's partition: once it is stored, anything published before it
    // there has been through the validator.
    let dev = Dev::start(&data, &["--topology", fixed.to_str().unwrap()]);
    let marker = reading_lines(&[26.0]);
    publish_lines(
        dev.mqtt_port(),
        "devices/furnace-1/telemetry",
        &marker,
        None,
    );
    wait_for("the marker in the store", &data, |s| {
        (event_count(s) >= 9).then_some(())
    });
    let store = store_of(&data);
    assert_eq!(event_count(&store), 9, "stored once, and the marker");
    assert_eq!(dlq(&store, None).len(), 3, "no new dead letters");
    block_on(store.close());
    dev.stop();

    let shown = sluice(&["dlq", "show", &ids[0], "--data-dir", d, "--json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["status"], "replayed");
    assert_eq!(shown["history"][0]["action"], "dlq.replay");
    assert!(
        shown["history"][0]["who"]
            .as_str()
            .unwrap()
            .starts_with("local:")
    );
    assert!(
        shown["raw_text"]
            .as_str()
            .unwrap()
            .contains("temperature_c")
    );
    assert_eq!(shown["headers"][0][0], "source");
}

fn offline(device: &str, seconds_ago: i64) -> Value {
    json!({
        "event_id": Uuid::new_v4().to_string(),
        "event_type": "device.status",
        "aggregate_id": device,
        "occurred_at": (chrono::Utc::now() - chrono::TimeDelta::seconds(seconds_ago)).to_rfc3339(),
        "payload": {"state": "offline", "reason": "battery"},
    })
}

fn ledger_outcomes(dev: &Dev) -> String {
    dev.sql("SELECT outcome, count(*) AS n FROM action_ledger GROUP BY outcome ORDER BY outcome")
}

/// Status events that paged someone are replayed: with actions suppressed, the router's
/// requests are recorded and nothing is delivered (the receiver's log proves it); with
/// `--actions fire`, the executor's dedup still delivers nothing delivered before.
#[test]
fn replays_deliver_no_webhook_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let webhooks = data.join("webhooks.jsonl");
    let dev = Dev::start(&data, &[]);
    // Two outages of dev-a (the second inside the rule's dedup window: no page) and one of dev-b.
    post(
        &dev,
        &[
            offline("dev-a", 30),
            offline("dev-a", 20),
            offline("dev-b", 10),
        ],
    );
    let delivered = until("two webhooks", || {
        let log = std::fs::read_to_string(&webhooks).unwrap_or_default();
        if log.lines().count() >= 2 {
            Ok(log)
        } else {
            Err(log)
        }
    });
    assert!(delivered.contains("dev-a went offline") && delivered.contains("dev-b went offline"));
    // A clean stop drains the pipeline: the second dev-a event was deduplicated by the router,
    // and nothing is left to deliver.
    dev.stop();
    let before = std::fs::read_to_string(&webhooks).unwrap();
    assert_eq!(before.lines().count(), 2, "{before}");
    assert_nothing_pending(&data);

    for (flags, expect) in [
        (vec![], "actions suppressed"),
        (vec!["--actions", "fire"], "actions fired"),
    ] {
        let mut args = vec![
            "replay",
            "--data-dir",
            d,
            "--to-topic",
            "events.device-status",
            "--type",
            "device.status",
        ];
        args.extend(flags.iter().copied());
        let out = sluice(&args);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("3 event(s) published"),
            "{}",
            text(&out)
        );
        assert!(text(&out).contains(expect), "{}", text(&out));

        let dev = Dev::start(&data, &[]);
        // Wait until the executor has recorded what the replay asked for.
        let outcomes = until("the replayed actions recorded", || {
            let outcomes = ledger_outcomes(&dev);
            let replayed = outcomes.contains("duplicate,") || outcomes.contains("suppressed,");
            let count = |o: &str| {
                outcomes
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{o},")))
                    .map_or(0, |n| n.parse::<u32>().unwrap())
            };
            let handled = count("duplicate") + count("suppressed");
            if replayed && handled >= if flags.is_empty() { 3 } else { 5 } {
                Ok(outcomes)
            } else {
                Err(outcomes)
            }
        });
        if flags.is_empty() {
            // dev-a's second outage was never paged: now it is recorded as suppressed.
            assert!(outcomes.contains("suppressed,1"), "{outcomes}");
        }
        dev.stop();
        let after = std::fs::read_to_string(&webhooks).unwrap();
        assert_eq!(after, before, "nothing delivered again ({flags:?})");
        assert_nothing_pending(&data);
    }
}

/// No action waits for delivery: what was not delivered by now never will be.
fn assert_nothing_pending(data: &Path) {
    let store = store_of(data);
    assert_eq!(block_on(store.actions_pending()).unwrap(), 0);
    block_on(store.close());
}

fn rollups_equal_from_scratch(store: &Store, version: i32) {
    for res in [Resolution::Minute, Resolution::Hour] {
        let live = block_on(store.rollups(version, res, None)).unwrap();
        let scratch = block_on(store.rollups_from_scratch(version, res)).unwrap();
        assert_eq!(live.len(), scratch.len(), "{res:?}");
        for (a, b) in live.iter().zip(&scratch) {
            assert_eq!(
                (&a.device_id, a.bucket, &a.metric, a.count),
                (&b.device_id, b.bucket, &b.metric, b.count)
            );
            assert_eq!((a.min, a.max, a.last), (b.min, b.max, b.last));
            assert!((a.sum - b.sum).abs() <= 1e-6 * a.sum.abs().max(1.0));
        }
    }
}

/// A rebuild while the fleet keeps publishing: during it the SQL endpoint answers from the
/// live version while the new one is partial; a crash (SIGKILL) mid-rebuild is resumed; at
/// the end readers are on the new version, whose rollups equal the live ones it replaced and
/// a from-scratch GROUP BY, with every reading in it.
#[test]
fn a_rebuild_serves_the_old_version_until_the_switch_and_resumes_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let dev = Dev::start(&data, &[]);
    let devices: u32 = 12;
    for i in 0..devices {
        let temps: Vec<f64> = (0..100)
            .map(|k| 20.0 + f64::from((k * 7 + i) % 13u32) / 4.0)
            .collect();
        publish_lines(
            dev.mqtt_port(),
            &format!("devices/dev-{i}/telemetry"),
            &reading_lines(&temps),
            None,
        );
    }
    let total = u64::from(devices) * 100;
    wait_for("every reading projected", &data, |s| {
        (block_on(s.readings_count(1)).unwrap() == total).then_some(())
    });
    let store = store_of(&data);
    let v1_hours = block_on(store.rollups(1, Resolution::Hour, None)).unwrap();

    // Slowly, so it can be watched and crashed: 1,200 events at 300/s.
    let mut job = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "replay",
            "--data-dir",
            d,
            "--rebuild",
            "projector",
            "--rate",
            "300",
        ])
        .current_dir(repo())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (job_id, partial) = wait_for("the rebuild under way", &data, |s| {
        let jobs = block_on(s.replay_jobs(1)).unwrap();
        let job = jobs.first()?;
        let built = block_on(s.readings_count(2)).unwrap();
        (job.done >= 300 && built > 0 && built < total).then(|| (job.job_id.clone(), built))
    });
    // Readers still see version 1, whole: hot tables and the store's own.
    let served = dev.sql("SELECT count(*) AS n FROM store.readings");
    assert!(
        served.contains(&total.to_string()),
        "answered from the live version: {served} (v2 has {partial})"
    );
    job.kill().unwrap();
    job.wait().unwrap();

    // More readings meanwhile: the projector writes both versions.
    let more = reading_lines(&[30.0; 50]);
    publish_lines(dev.mqtt_port(), "devices/dev-late/telemetry", &more, None);
    let total = total + 50;
    wait_for("the new readings in version 1", &data, |s| {
        (block_on(s.readings_count(1)).unwrap() == total).then_some(())
    });

    let waiting = sluice(&["replay", "resume", &job_id, "--data-dir", d]);
    assert!(
        !waiting.status.success(),
        "a job that may still run is not taken over silently"
    );
    assert!(text(&waiting).contains("--force"), "{}", text(&waiting));
    let resumed = sluice(&["replay", "resume", &job_id, "--force", "--data-dir", d]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(
        text(&resumed).contains("rebuilt projector as version 2"),
        "{}",
        text(&resumed)
    );
    let listed = sluice(&["replay", "list", "--data-dir", d, "--json"]);
    let jobs: Vec<Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        (jobs[0]["state"].as_str(), jobs[0]["done"].as_u64()),
        (Some("done"), Some(total))
    );

    assert_eq!(block_on(store.live_version("projector", 1)).unwrap(), 2);
    assert_eq!(block_on(store.readings_count(2)).unwrap(), total);
    assert_eq!(
        block_on(store.readings_count(1)).unwrap(),
        0,
        "the old version is dropped"
    );
    rollups_equal_from_scratch(&store, 2);
    let v2_hours: Vec<_> = block_on(store.rollups(2, Resolution::Hour, None))
        .unwrap()
        .into_iter()
        .filter(|r| r.device_id != "dev-late")
        .collect();
    assert_eq!(v2_hours.len(), v1_hours.len());
    for (a, b) in v2_hours.iter().zip(&v1_hours) {
        assert_eq!(
            (&a.device_id, a.bucket, &a.metric, a.count, a.min, a.max),
            (&b.device_id, b.bucket, &b.metric, b.count, b.min, b.max)
        );
    }
    // Readers moved to version 2: the store's readings are served whole again.
    until("version 2 served", || {
        let served = dev.sql("SELECT count(*) AS n FROM store.readings");
        if served.contains(&total.to_string()) {
            Ok(())
        } else {
            Err(served)
        }
    });
    block_on(store.close());
    dev.stop();
}
