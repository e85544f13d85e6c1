//! The Postgres wire protocol, so `psql`, psycopg and BI tools connect. Built on
//! `datafusion-postgres` (its `pg_catalog` makes `\d` work) with Sluice's own parts in front:
//! the password is an API key (role `viewer` or above), every statement passes the read-only
//! guard, simple queries run under the engine's per-query limits, and prepared (extended)
//! queries get the row limit in their plan, the time limit as their `statement_timeout`, and
//! the session's memory pool.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::DfSessionService;
use datafusion_postgres::QueryHook;
use datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::pgwire::api::auth::{
    DefaultServerParameterProvider, LoginInfo, StartupHandler, finish_authentication,
    protocol_negotiation, save_startup_parameters_to_metadata,
};
use datafusion_postgres::pgwire::api::portal::Format;
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::{ClientInfo, PgWireConnectionState, PgWireServerHandlers};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::startup::Authentication;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::pgwire::types::format::FormatOptions;
use futures::{Sink, SinkExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Denied, Keys};
use crate::guard::{self, Verdict};
use crate::{Engine, QueryError};

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_owned(),
        code.to_owned(),
        message.into(),
    )))
}

fn pg_error(e: &QueryError) -> PgWireError {
    // SQLSTATE: 25006 read_only_sql_transaction, 42601 syntax_error (and friends),
    // 53000 insufficient_resources, 57014 query_canceled, 08006 connection failure, XX000.
    let code = match e {
        QueryError::ReadOnly(_) => "25006",
        QueryError::Invalid { .. } => "42601",
        QueryError::Limit(m) if m.contains("time limit") => "57014",
        QueryError::Limit(_) => "53000",
        QueryError::Unavailable(_) => "08006",
        QueryError::Internal(_) => "XX000",
    };
    user_error(code, e.to_string())
}

/// Checks every statement and runs queries under the engine's limits.
struct Guard {
    engine: Arc<Engine>,
}

impl Guard {
    async fn checked_plan(&self, statement: &Statement) -> Option<PgWireResult<LogicalPlan>> {
        match guard::check(statement) {
            Verdict::Query => {}
            Verdict::Session => return None,
            Verdict::Refused(why) => return Some(Err(pg_error(&QueryError::ReadOnly(why)))),
        }
        let planned = self
            .engine
            .plan(DfStatement::Statement(Box::new(statement.clone())))
            .await;
        Some(planned.map_err(|e| pg_error(&e)))
    }
}

#[async_trait]
impl QueryHook for Guard {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        let plan = match self.checked_plan(statement).await? {
            Ok(plan) => plan,
            Err(e) => return Some(Err(e)),
        };
        let output = match self.engine.run(plan, std::time::Instant::now()).await {
            Ok(o) => o,
            Err(e) => return Some(Err(pg_error(&e))),
        };
        // An empty answer keeps its columns.
        let table = datafusion::datasource::MemTable::try_new(output.schema, vec![output.batches]);
        let frame = match table.and_then(|t| self.engine.context().read_table(Arc::new(t))) {
            Ok(df) => df,
            Err(e) => return Some(Err(user_error("XX000", e.to_string()))),
        };
        let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        Some(
            encode_dataframe(frame, &Format::UnifiedText, Some(options))
                .await
                .map(Response::Query),
        )
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        let plan = match self.checked_plan(statement).await? {
            Ok(plan) => plan,
            Err(e) => return Some(Err(e)),
        };
        let max = self.engine.limits().max_rows;
        Some(
            LogicalPlanBuilder::from(plan)
                .limit(0, Some(max))
                .and_then(LogicalPlanBuilder::build)
                .map_err(|e| pg_error(&QueryError::from_df(e))),
        )
    }

    async fn handle_extended_query(
        &self,
        _statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        None
    }
}

/// Cleartext password authentication where the password is an API key. The user name is
/// only recorded.
#[derive(Debug)]
struct KeyStartup {
    keys: Keys,
    timeout_ms: u128,
    params: DefaultServerParameterProvider,
}

#[async_trait]
impl StartupHandler for KeyStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                let user = LoginInfo::from_client_info(client)
                    .user()
                    .map(str::to_owned)
                    .unwrap_or_default();
                match self.keys.may_query(pwd.password.trim()).await {
                    Ok(key) => {
                        tracing::debug!(user, key = %key.id, "SQL session opened");
                        // The time limit, as the session's statement_timeout (which clients
                        // cannot raise: SET statement_timeout is refused).
                        client.metadata_mut().insert(
                            "statement_timeout_ms".to_owned(),
                            self.timeout_ms.to_string(),
                        );
                        finish_authentication(client, &self.params).await?;
                    }
                    Err(Denied::Unauthenticated(_)) => {
                        return Err(user_error(
                            "28P01",
                            format!(
                                "password authentication failed for user \"{user}\": the \
                                 password must be a Sluice API key"
                            ),
                        ));
                    }
                    Err(Denied::Forbidden(m)) => return Err(user_error("28000", m)),
                    Err(e @ Denied::Unavailable(_)) => {
                        return Err(user_error("08006", e.to_string()));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The handlers of one server.
struct Handlers {
    session: Arc<DfSessionService>,
    startup: Arc<KeyStartup>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(
        &self,
    ) -> Arc<impl datafusion_postgres::pgwire::api::query::SimpleQueryHandler> {
        self.session.clone()
    }

    fn extended_query_handler(
        &self,
    ) -> Arc<impl datafusion_postgres::pgwire::api::query::ExtendedQueryHandler> {
        self.session.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

/// Serves the Postgres wire protocol on `listener` until `shutdown`.
pub async fn serve(
    engine: Arc<Engine>,
    keys: Keys,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let hooks: Vec<Arc<dyn QueryHook>> = vec![
        Arc::new(Guard {
            engine: engine.clone(),
        }),
        Arc::new(SetShowHook),
        Arc::new(TransactionStatementHook),
    ];
    let mut params = DefaultServerParameterProvider::default();
    params.server_version = format!("16.0 (Sluice {})", env!("CARGO_PKG_VERSION"));
    let handlers = Arc::new(Handlers {
        session: Arc::new(DfSessionService::new_with_hooks(
            Arc::new(engine.context().clone()),
            hooks,
        )),
        startup: Arc::new(KeyStartup {
            keys,
            timeout_ms: engine.limits().timeout.as_millis(),
            params,
        }),
    });
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = shutdown.cancelled() => return Ok(()),
        };
        let handlers = handlers.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = datafusion_postgres::pgwire::tokio::process_socket(socket, None, handlers) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "SQL session ended with an error");
                    }
                }
                () = shutdown.cancelled() => {}
            }
        });
    }
}
