//! API keys for both front doors: a key with role `viewer` or above may query. Verified keys
//! are cached briefly, so a query does not hash and look up its key each time; a revoked key
//! stops working within that time.

use std::time::Duration;

use sluice_store::{ApiKey, Store};

const CACHE_TTL: Duration = Duration::from_secs(10);

/// Why a key was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No key, or one that is unknown or revoked.
    #[error("{0}")]
    Unauthenticated(String),
    /// A key whose role may not query.
    #[error("{0}")]
    Forbidden(String),
    /// The store could not be asked.
    #[error("cannot check the API key, retry later: {0}")]
    Unavailable(String),
}

/// Checks API keys against the store.
#[derive(Debug, Clone)]
pub struct Keys {
    store: Store,
    cache: moka::future::Cache<String, Option<ApiKey>>,
}

impl Keys {
    /// Keys of `store`.
    pub fn new(store: Store) -> Keys {
        Keys {
            store,
            cache: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(CACHE_TTL)
                .build(),
        }
    }

    /// The key `token`, when it may query.
    pub async fn may_query(&self, token: &str) -> Result<ApiKey, Denied> {
        let store = self.store.clone();
        let owned = token.to_owned();
        let found = self
            .cache
            .try_get_with(
                owned.clone(),
                async move { store.verify_api_key(&owned).await },
            )
            .await;
        match found {
            Ok(Some(key)) if key.role.may_query() => Ok(key),
            Ok(Some(key)) => Err(Denied::Forbidden(format!(
                "key {} has role {}; queries need role viewer or above",
                key.id, key.role
            ))),
            Ok(None) => Err(Denied::Unauthenticated("unknown or revoked API key".into())),
            Err(e) => Err(Denied::Unavailable(e.to_string())),
        }
    }
}
