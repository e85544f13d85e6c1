//! `sluice keys` as a user runs it: `create` prints the token once, `list` shows keys but
//! never their secrets, `revoke` revokes once; without --store, the `sluice dev` store.

use std::path::Path;
use std::process::{Command, Output};

use sluice_store::{Store, StoreOptions};

fn sluice(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .current_dir(cwd)
        // The default store is part of what is tested; the caller's must not leak in.
        .env_remove("SLUICE__STORE")
        .output()
        .expect("run sluice")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\n{}{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn list_json(cwd: &Path, store: &str) -> Vec<serde_json::Value> {
    let out = ok(&sluice(cwd, &["keys", "list", "--json", "--store", store]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Whether the store accepts `token`, asked the way a server would.
fn verifies(url: &str, token: &str) -> bool {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::connect(url, StoreOptions::default()).await.unwrap();
        let key = store.verify_api_key(token).await.unwrap();
        store.close().await;
        key.is_some()
    })
}

#[test]
fn create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("keys.db").display());
    let cwd = dir.path();

    let out = sluice(
        cwd,
        &[
            "keys", "create", "--role", "device", "--name", "sensor-7", "--store", &store,
        ],
    );
    let stdout = ok(&out);
    let token = stdout.lines().next().unwrap_or_default().to_owned();
    assert_eq!(stdout, format!("{token}\n"), "the token alone on stdout");
    let (id, secret) = token
        .strip_prefix("sk_")
        .and_then(|t| t.split_once('_'))
        .unwrap_or_else(|| panic!("not a token: {token}"));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("created key {id} (role device, name sensor-7)"))
            && stderr.contains("not shown again"),
        "{stderr}"
    );
    assert!(verifies(&store, &token));

    let table = ok(&sluice(cwd, &["keys", "list", "--store", &store]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("REVOKED"),
        "{table}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[2], row[4]),
        (id, "device", "sensor-7", "-")
    );
    assert!(!table.contains(secret), "the secret is shown again");

    let listed = list_json(cwd, &store);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["role"], "device");
    assert_eq!(listed[0]["name"], "sensor-7");
    assert!(listed[0]["revoked_at"].is_null());

    let out = sluice(cwd, &["keys", "revoke", id, "--store", &store]);
    assert_eq!(ok(&out), format!("revoked {id}\n"));
    assert!(!verifies(&store, &token), "a revoked key is refused");
    let listed = list_json(cwd, &store);
    assert!(listed[0]["revoked_at"].is_string(), "{listed:?}");
    let table = ok(&sluice(cwd, &["keys", "list", "--store", &store]));
    let revoked = table
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().last());
    assert!(revoked.is_some_and(|t| t.ends_with('Z')), "{table}");

    let again = sluice(cwd, &["keys", "revoke", id, "--store", &store]);
    assert_eq!(again.status.code(), Some(1));
    assert!(again.stdout.is_empty());
    let stderr = text(&again.stderr);
    assert!(stderr.contains(&format!("no active key {id}")), "{stderr}");
}

#[test]
fn without_store_the_dev_store_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();

    // Nothing to list or revoke in a store that is not there, and none is created.
    for args in [&["keys", "list"][..], &["keys", "revoke", "0123456789ab"]] {
        let out = sluice(cwd, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("no store at .sluice/sluice.db"), "{stderr}");
    }
    assert!(!cwd.join(".sluice").exists());

    let token = ok(&sluice(cwd, &["keys", "create", "--role", "admin"]));
    assert!(cwd.join(".sluice/sluice.db").is_file());
    let dev = format!("sqlite://{}", cwd.join(".sluice/sluice.db").display());
    assert!(verifies(&dev, token.trim_end()));
    let table = ok(&sluice(cwd, &["keys", "list"]));
    assert!(table.lines().nth(1).unwrap().contains("admin"), "{table}");
}
