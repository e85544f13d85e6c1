//! `sluice keys`: create, list and revoke API keys in the store. `create` prints the token alone
//! on stdout, so a script can capture it; it is the only time the secret is shown.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use sluice_store::{ApiKey, Role, Store, StoreOptions};

use crate::cli::{KeyRole, KeysCommand};
use crate::commands::{redact, runtime};

/// The store of `sluice dev`, used when no --store is given.
const DEV_STORE: &str = "sqlite://.sluice/sluice.db";

pub fn keys(cmd: &KeysCommand) -> Result<ExitCode> {
    let (KeysCommand::Create { store, .. }
    | KeysCommand::List { store, .. }
    | KeysCommand::Revoke { store, .. }) = cmd;
    let url = store.store.as_deref().unwrap_or(DEV_STORE);
    let shown = redact(url);
    // Opening a SQLite path creates it: fine for a first key, but listing or revoking in a
    // store that is not there would only hide a wrong path behind an empty answer.
    if let Some(path) = url.strip_prefix("sqlite://")
        && !matches!(cmd, KeysCommand::Create { .. })
        && !Path::new(path).exists()
    {
        bail!("no store at {path}: start `sluice dev` there, or pass --store URL");
    }
    runtime()?.block_on(async {
        let opts = StoreOptions {
            migrate_on_connect: true,
            ..StoreOptions::default()
        };
        let store = Store::connect(url, opts)
            .await
            .with_context(|| format!("cannot open the store {shown}"))?;
        let result = match cmd {
            KeysCommand::Create { role, name, .. } => create(&store, *role, name.as_deref()).await,
            KeysCommand::List { json, .. } => list(&store, *json).await,
            KeysCommand::Revoke { id, .. } => revoke(&store, id).await,
        };
        store.close().await;
        result
    })
}

async fn create(store: &Store, role: KeyRole, name: Option<&str>) -> Result<ExitCode> {
    let (key, token) = store.create_api_key(role_of(role), name).await?;
    println!("{token}");
    let name = key
        .name
        .as_deref()
        .map_or_else(|| "no name".to_owned(), |n| format!("name {n}"));
    eprintln!(
        "created key {} (role {}, {name}); store it now: it is not shown again",
        key.id, key.role
    );
    Ok(ExitCode::SUCCESS)
}

async fn list(store: &Store, json: bool) -> Result<ExitCode> {
    let keys = store.list_api_keys().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
    } else {
        print!("{}", table(&keys));
    }
    Ok(ExitCode::SUCCESS)
}

async fn revoke(store: &Store, id: &str) -> Result<ExitCode> {
    if store.revoke_api_key(id).await? {
        println!("revoked {id}");
        Ok(ExitCode::SUCCESS)
    } else {
        bail!("no active key {id} (no key has that id, or it is already revoked)")
    }
}

fn role_of(role: KeyRole) -> Role {
    match role {
        KeyRole::Device => Role::Device,
        KeyRole::Viewer => Role::Viewer,
        KeyRole::Operator => Role::Operator,
        KeyRole::Admin => Role::Admin,
    }
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The keys as aligned columns under a header; the header alone when there are none.
fn table(keys: &[ApiKey]) -> String {
    let mut rows = vec![["ID", "ROLE", "NAME", "CREATED", "REVOKED"].map(str::to_owned)];
    rows.extend(keys.iter().map(|k| {
        [
            k.id.clone(),
            k.role.to_string(),
            k.name.clone().unwrap_or_else(|| "-".to_owned()),
            time(k.created_at),
            k.revoked_at.map_or_else(|| "-".to_owned(), time),
        ]
    }));
    let mut widths = [0; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let t = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let keys = [
            ApiKey {
                id: "0123456789ab".into(),
                name: Some("a long name".into()),
                role: Role::Device,
                created_at: t,
                revoked_at: Some(t),
            },
            ApiKey {
                id: "ba9876543210".into(),
                name: None,
                role: Role::Operator,
                created_at: t,
                revoked_at: None,
            },
        ];
        assert_eq!(
            table(&keys),
            "ID            ROLE      NAME         CREATED               REVOKED\n\
             0123456789ab  device    a long name  2023-11-14T22:13:20Z  2023-11-14T22:13:20Z\n\
             ba9876543210  operator  -            2023-11-14T22:13:20Z  -\n"
        );
        assert_eq!(table(&[]), "ID  ROLE  NAME  CREATED  REVOKED\n");
    }
}
