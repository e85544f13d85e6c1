//! What the operator commands (`sluice dlq`, `sluice replay`) share: where they work, as whom,
//! times on the command line, and progress bars.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use sluice_store::{Role, Store, StoreOptions};

use crate::cli::OpsTarget;
use crate::commands::redact;

/// An operator's session: the store, who they are (for the audit log), and where to publish.
pub(crate) struct Ops {
    pub store: Store,
    /// `local:<user>` or `key:<id>`.
    pub who: String,
    /// The data directory, when working locally.
    pub data_dir: Option<PathBuf>,
    /// The log URL, when one is known.
    pub log_url: Option<String>,
}

impl Ops {
    /// Opens the store of `target` and checks the caller may operate on it: locally, file
    /// access to the data directory is the permission; against a store URL, an API key with
    /// role operator or admin.
    pub async fn connect(target: &OpsTarget) -> Result<Ops> {
        let opts = StoreOptions {
            migrate_on_connect: true,
            ..StoreOptions::default()
        };
        let local = match (&target.data_dir, &target.store) {
            (Some(dir), _) => Some(dir.clone()),
            (None, None) => Some(PathBuf::from(".sluice")),
            (None, Some(_)) => None,
        };
        if let Some(dir) = local {
            let db = dir.join("sluice.db");
            if !db.is_file() {
                bail!(
                    "no Sluice data in {}: run `sluice dev --data-dir {}` first, or pass --store URL --key KEY",
                    dir.display(),
                    dir.display()
                );
            }
            let store = Store::connect(&format!("sqlite://{}", db.display()), opts)
                .await
                .with_context(|| format!("cannot open the store in {}", dir.display()))?;
            let user = local_user();
            let log_url = target
                .log
                .clone()
                .unwrap_or_else(|| format!("embedded://{}", dir.join("log").display()));
            return Ok(Ops {
                store,
                who: format!("local:{user}"),
                data_dir: Some(dir),
                log_url: Some(log_url),
            });
        }
        let url = target.store.as_deref().expect("a store URL");
        let Some(token) = target.key.as_deref() else {
            bail!(
                "operator commands against {} need an API key with role operator: --key KEY \
                 (or SLUICE__API_KEY); create one with `sluice keys create --role operator`",
                redact(url)
            );
        };
        let store = Store::connect(url, opts)
            .await
            .with_context(|| format!("cannot open the store {}", redact(url)))?;
        let Some(key) = store.verify_api_key(token).await? else {
            store.close().await;
            bail!("the API key is not valid (unknown, wrong secret, or revoked)");
        };
        if !matches!(key.role, Role::Operator | Role::Admin) {
            store.close().await;
            bail!(
                "API key {} has role {}; operator commands need operator or admin",
                key.id,
                key.role
            );
        }
        Ok(Ops {
            store,
            who: format!("key:{}", key.id),
            data_dir: None,
            log_url: target.log.clone(),
        })
    }

    /// The log URL, or why there is none.
    pub fn log_url(&self) -> Result<&str> {
        self.log_url.as_deref().ok_or_else(|| {
            anyhow!("this command publishes: give --log kafka://host:port (or SLUICE__LOG)")
        })
    }
}

/// The name of the user running this command, for the audit log.
fn local_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let out = std::process::Command::new("id").arg("-un").output().ok()?;
            let name = String::from_utf8(out.stdout).ok()?.trim().to_owned();
            (!name.is_empty()).then_some(name)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Opens the embedded log at `url`, saying what to do when `sluice dev` holds it.
pub(crate) fn open_embedded(url: &str) -> Result<sluice_log::EmbeddedLog> {
    sluice_log::EmbeddedLog::from_url(url).map_err(|e| {
        let dir = url.trim_start_matches("embedded://");
        if e.to_string().contains("in use") {
            anyhow!(
                "the log in {dir} is in use: stop the `sluice dev` running on it, then run this \
                 again (it processes what was published when it starts)"
            )
        } else {
            anyhow!("cannot open the log {url}: {e}")
        }
    })
}

/// A time on the command line: RFC 3339, or a duration meaning that long ago ("90m", "2d").
pub(crate) fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    match humantime::parse_duration(text) {
        Ok(ago) => Ok(now - chrono::TimeDelta::from_std(ago).context("that duration is too long")?),
        Err(_) => bail!(
            "{text:?} is not a time: give RFC 3339 (2026-11-24T08:00:00Z) or a duration ago (90m, 2d)"
        ),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal): done / total, rate, ETA.
pub(crate) fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_time("2026-11-24T08:00:00+01:00", now)
                .unwrap()
                .to_rfc3339(),
            "2026-11-24T07:00:00+00:00"
        );
        assert_eq!(
            parse_time("90m", now).unwrap().to_rfc3339(),
            "2026-11-24T10:30:00+00:00"
        );
        let err = parse_time("yesterday", now).unwrap_err().to_string();
        assert!(err.contains("RFC 3339"), "{err}");
    }
}
