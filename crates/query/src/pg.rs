//! The Postgres wire protocol, so `psql`, psycopg and BI tools connect. Built on
//! `datafusion-postgres` (its `pg_catalog` makes `\d` work) with Sluice's own parts in front:
//! the password is an API key (role `viewer` or above), every statement passes the read-only
//! guard, simple queries run under the engine's per-query limits, and prepared (extended)
//! queries get the row limit in their plan, the time limit as their `statement_timeout`, and
//! the session's memory pool.
//!
//! Every query is planned against the engine served when it runs, prepared ones again at each
//! execution: a client that keeps a statement prepared must not keep reading a projection
//! version that a rebuild retired.

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
use datafusion_postgres::pgwire::api::portal::{Format, Portal};
use datafusion_postgres::pgwire::api::query::ExtendedQueryHandler;
use datafusion_postgres::pgwire::api::results::Response;
use datafusion_postgres::pgwire::api::stmt::StoredStatement;
use datafusion_postgres::pgwire::api::store::PortalStore;
use datafusion_postgres::pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers,
};
use datafusion_postgres::pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use datafusion_postgres::pgwire::messages::startup::Authentication;
use datafusion_postgres::pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use datafusion_postgres::pgwire::types::format::FormatOptions;
use futures::{Sink, SinkExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Denied, Keys};
use crate::guard::{self, Verdict};
use crate::{Engine, QueryError, Served};

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

/// The plan of a query, checked; `None` for session chatter (`SET`, `SHOW`, `BEGIN`, ...).
async fn checked_plan(engine: &Engine, statement: &Statement) -> Option<PgWireResult<LogicalPlan>> {
    match guard::check(statement) {
        Verdict::Query => {}
        Verdict::Session => return None,
        Verdict::Refused(why) => return Some(Err(pg_error(&QueryError::ReadOnly(why)))),
    }
    let planned = engine
        .plan(DfStatement::Statement(Box::new(statement.clone())))
        .await;
    Some(planned.map_err(|e| pg_error(&e)))
}

/// The plan of a prepared query: checked, with the row limit in it.
async fn prepared_plan(
    engine: &Engine,
    statement: &Statement,
) -> Option<PgWireResult<LogicalPlan>> {
    let plan = match checked_plan(engine, statement).await? {
        Ok(plan) => plan,
        Err(e) => return Some(Err(e)),
    };
    Some(
        LogicalPlanBuilder::from(plan)
            .limit(0, Some(engine.limits().max_rows))
            .and_then(LogicalPlanBuilder::build)
            .map_err(|e| pg_error(&QueryError::from_df(e))),
    )
}

/// Checks every statement and runs simple queries under the engine's limits.
struct Guard {
    served: Served,
}

#[async_trait]
impl QueryHook for Guard {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        // One engine from planning to the answer, so one projection version.
        let engine = self.served.engine();
        let plan = match checked_plan(&engine, statement).await? {
            Ok(plan) => plan,
            Err(e) => return Some(Err(e)),
        };
        let output = match engine.run(plan, std::time::Instant::now()).await {
            Ok(o) => o,
            Err(e) => return Some(Err(pg_error(&e))),
        };
        // An empty answer keeps its columns.
        let table = datafusion::datasource::MemTable::try_new(output.schema, vec![output.batches]);
        let frame = match table.and_then(|t| engine.context().read_table(Arc::new(t))) {
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

    /// The plan described to the client (parameter and column types); [`Prepared`] plans the
    /// statement again when it runs.
    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        prepared_plan(&self.served.engine(), statement).await
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

/// Runs prepared statements as `datafusion-postgres` does (parameters, result formats,
/// `statement_timeout`), but on a plan made against the engine served at execution: the one
/// made at Parse may be of a version retired since, and clients keep statements prepared for
/// the life of a connection.
struct Prepared {
    session: Arc<DfSessionService>,
    served: Served,
}

#[async_trait]
impl ExtendedQueryHandler for Prepared {
    type Statement = <DfSessionService as ExtendedQueryHandler>::Statement;
    type QueryParser = <DfSessionService as ExtendedQueryHandler>::QueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.session.query_parser()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let (sql, Some((statement, _))) = &portal.statement.statement else {
            return self.session.do_query(client, portal, max_rows).await;
        };
        let Some(plan) = prepared_plan(&self.served.engine(), statement).await else {
            return self.session.do_query(client, portal, max_rows).await;
        };
        // The same portal (parameters, formats, state) over the new plan.
        let stored = &portal.statement;
        let mut current = Portal::default();
        current.name.clone_from(&portal.name);
        current.statement = Arc::new(StoredStatement::new(
            stored.id.clone(),
            (sql.clone(), Some((statement.clone(), plan?))),
            stored.parameter_types.clone(),
        ));
        current.parameter_format = portal.parameter_format.clone();
        current.parameters.clone_from(&portal.parameters);
        current.result_column_format = portal.result_column_format.clone();
        current.state = portal.state.clone();
        self.session.do_query(client, &current, max_rows).await
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
    prepared: Arc<Prepared>,
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
        self.prepared.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

/// Serves the Postgres wire protocol on `listener` until `shutdown`, each query from
/// `engine` (one [`Engine`], or whichever [`Served`] holds when the query runs).
pub async fn serve(
    engine: impl Into<Served>,
    keys: Keys,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let served = engine.into();
    let limits = served.engine().limits().clone();
    // Prepared statements run in this session, whatever engine planned them: its memory pool
    // bounds them. It holds no tables, so it keeps no retired version alive.
    let session = crate::session(&limits).map_err(std::io::Error::other)?;
    let hooks: Vec<Arc<dyn QueryHook>> = vec![
        Arc::new(Guard {
            served: served.clone(),
        }),
        Arc::new(SetShowHook),
        Arc::new(TransactionStatementHook),
    ];
    let mut params = DefaultServerParameterProvider::default();
    params.server_version = format!("16.0 (Sluice {})", env!("CARGO_PKG_VERSION"));
    let session = Arc::new(DfSessionService::new_with_hooks(Arc::new(session), hooks));
    let handlers = Arc::new(Handlers {
        session: session.clone(),
        prepared: Arc::new(Prepared { session, served }),
        startup: Arc::new(KeyStartup {
            keys,
            timeout_ms: limits.timeout.as_millis(),
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
