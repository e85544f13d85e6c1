//! The mqtt-bridge: subscribes to an MQTT broker with QoS 1 and writes every message to the
//! raw ingest topic, keyed by device id, acknowledging (PUBACK) a message only after the log
//! acknowledged its write. A crash before that means the broker delivers it again, never that
//! it is lost.
//!
//! The bridge keeps a persistent session (a fixed client id, clean session off), so messages
//! that arrive while it is down wait in the broker (within the broker's queue limits, e.g.
//! Mosquitto's `max_queued_messages`). It reconnects with backoff; a broker outage never stops
//! it. A message the log refuses for good (too large) stops the bridge without acknowledging
//! it, so it stays in the broker for an operator to deal with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use sluice_log::{Log, Producer, Record};
use sluice_runtime::{DEFAULT_BACKOFF, backoff_delay};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use sluice_topology::MqttBridgeConfig;

pub mod broker;
pub mod raw;
pub mod testing;

pub use broker::EmbeddedBroker;

/// The processor's name in topologies and metrics.
pub const NAME: &str = "mqtt-bridge";

/// Errors that stop the bridge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (bad URL, unreadable certificate).
    #[error("mqtt-bridge {name}: {reason}")]
    Config {
        /// The instance.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The log refused a write that retrying will not fix; the message was not acknowledged.
    #[error("mqtt-bridge {name}: log refused a message from {topic}: {source}")]
    Log {
        /// The instance.
        name: String,
        /// The MQTT topic of the first refused message.
        topic: String,
        /// The cause.
        source: sluice_log::Error,
    },
}

/// How the bridge runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The instance name, for logs and the default client id.
    pub name: String,
    /// Broker, subscriptions, mapping, credentials.
    pub config: MqttBridgeConfig,
    /// The raw topic written to.
    pub output: String,
    /// The broker password (from the environment variable the config names).
    pub password: Option<String>,
    /// Longest wait between reconnection attempts or write retries.
    pub max_backoff: Duration,
}

impl Settings {
    /// Settings for an instance called `name` writing to `output`, with defaults elsewhere.
    pub fn new(name: &str, output: &str) -> Settings {
        Settings {
            name: name.to_owned(),
            config: MqttBridgeConfig::default(),
            output: output.to_owned(),
            password: None,
            max_backoff: Duration::from_secs(30),
        }
    }

    /// The client id the bridge keeps its session under.
    pub fn client_id(&self) -> String {
        self.config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("sluice-{}", self.name))
    }
}

/// What the bridge has done, for progress lines and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received from the broker (redeliveries included).
    pub received: AtomicU64,
    /// Messages written to the log and acknowledged to the broker.
    pub acknowledged: AtomicU64,
    /// Produce calls to the log.
    pub batches: AtomicU64,
    /// Connections established (the first one included).
    pub connections: AtomicU64,
    /// Subscriptions the broker granted (one per topic filter per connection).
    pub subscriptions: AtomicU64,
    /// Connection attempts or connections that failed.
    pub connection_errors: AtomicU64,
    /// Log writes retried after a transient failure.
    pub write_retries: AtomicU64,
}

/// Runs the bridge until `shutdown` fires, then writes and acknowledges what it holds and
/// disconnects.
pub async fn run<L: Log>(
    settings: &Settings,
    log: &L,
    stats: &Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let options = mqtt_options(settings)?;
    // Room for an acknowledgement per message the writer can hold, so acking never waits on
    // the event loop that is waiting on the writer.
    let held = settings.config.max_batch.max(1) * 4;
    let (client, mut events) = AsyncClient::new(options, held * 2 + 64);
    let producer = log.producer().map_err(|source| Error::Log {
        name: settings.name.clone(),
        topic: String::new(),
        source,
    })?;
    // Bounded by the broker's in-flight window in practice; the bound keeps memory flat
    // whatever the broker does.
    let (tx, rx) = mpsc::channel::<Publish>(held);
    // Aborted if `run` is dropped (a crash, for the broker): nothing unacknowledged is kept.
    let mut writer = AbortOnDrop(tokio::spawn(write_loop(
        settings.clone(),
        producer,
        client.clone(),
        rx,
        stats.clone(),
        shutdown.clone(),
    )));
    let filters = filters(settings);
    let qos = qos(settings.config.qos);
    let mut tx = Some(tx);
    let mut failures = 0u32;
    let result = loop {
        tokio::select! {
            done = &mut writer.0 => break done.expect("the writer does not panic"),
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    failures = 0;
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        processor = %settings.name,
                        broker = %settings.config.broker,
                        session_present = ack.session_present,
                        "connected"
                    );
                    // Subscribing again on a kept session is harmless and covers a broker
                    // that lost it.
                    for filter in &filters {
                        if let Err(e) = client.subscribe(filter.clone(), qos).await {
                            tracing::warn!(processor = %settings.name, %filter, error = %e, "cannot subscribe");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                        tracing::error!(processor = %settings.name, filters = ?filters, "the broker refused a subscription");
                    } else {
                        stats.subscriptions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    // After shutdown nothing new is taken: unacknowledged, it is redelivered.
                    if let Some(sender) = &tx {
                        tokio::select! {
                            sent = sender.send(publish) => { let _ = sent; }
                            () = shutdown.cancelled() => {}
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    failures += 1;
                    stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff_delay(&DEFAULT_BACKOFF, settings.max_backoff, failures + 1)
                        .max(Duration::from_millis(100));
                    let refused = matches!(
                        e,
                        rumqttc::ConnectionError::ConnectionRefused(
                            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
                        )
                    );
                    if refused {
                        tracing::error!(processor = %settings.name, broker = %settings.config.broker, error = %e, retry_in = ?wait, "the broker refused the credentials");
                    } else {
                        tracing::warn!(processor = %settings.name, broker = %settings.config.broker, error = %e, retry_in = ?wait, "broker connection failed");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled(), if tx.is_some() => {}
                    }
                }
            },
            () = shutdown.cancelled(), if tx.is_some() => {
                // The writer drains what was handed over, then finishes.
                tx = None;
            }
        }
    };
    // Let the last acknowledgements reach the broker before leaving.
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    result
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn filters(settings: &Settings) -> Vec<String> {
    let topics = &settings.config.topics;
    match &settings.config.shared_group {
        Some(group) => topics
            .iter()
            .map(|t| format!("$share/{group}/{t}"))
            .collect(),
        None => topics.clone(),
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn mqtt_options(settings: &Settings) -> Result<MqttOptions, Error> {
    let bad = |reason: String| Error::Config {
        name: settings.name.clone(),
        reason,
    };
    let url = &settings.config.broker;
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(bad(format!(
            "broker {url:?} must be mqtt://host:port or mqtts://host:port"
        )));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|e| bad(format!("broker {url:?}: port {port:?}: {e}")))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(bad(format!("broker {url:?} has no host")));
    }
    let mut options = MqttOptions::new(settings.client_id(), host, port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(user) = &settings.config.username {
        options.set_credentials(user, settings.password.clone().unwrap_or_default());
    }
    if tls {
        let ca = match &settings.config.tls_ca {
            Some(path) => std::fs::read(path)
                .map_err(|e| bad(format!("cannot read the CA certificate {path}: {e}")))?,
            None => Vec::new(),
        };
        let client_auth = match &settings.config.tls_client_pkcs12 {
            Some(path) => {
                let der = std::fs::read(path)
                    .map_err(|e| bad(format!("cannot read the client certificate {path}: {e}")))?;
                let password = settings
                    .config
                    .tls_client_pkcs12_password_env
                    .as_deref()
                    .and_then(|var| std::env::var(var).ok())
                    .unwrap_or_default();
                Some((der, password))
            }
            None => None,
        };
        let config = if ca.is_empty() && client_auth.is_none() {
            TlsConfiguration::Native
        } else {
            TlsConfiguration::SimpleNative { ca, client_auth }
        };
        options.set_transport(Transport::tls_with_config(config));
    }
    Ok(options)
}

/// Takes what the event loop hands over in batches, writes each batch, then acknowledges it.
async fn write_loop<P: Producer>(
    settings: Settings,
    producer: P,
    client: AsyncClient,
    mut rx: mpsc::Receiver<Publish>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let max = settings.config.max_batch.max(1);
    let mut batch: Vec<Publish> = Vec::with_capacity(max);
    loop {
        // `None` once the event loop stopped handing over (shutdown) and all is drained.
        if rx.recv_many(&mut batch, max).await == 0 {
            return Ok(());
        }
        let now = chrono::Utc::now();
        let records: Vec<Record> = batch
            .iter()
            .map(|p| raw::to_record(&settings.config.mapping, &p.topic, &p.payload, now))
            .collect();
        let mut failures = 0u32;
        loop {
            match producer.send(&settings.output, records.clone()).await {
                Ok(_) => break,
                Err(e) if e.is_transient() => {
                    failures += 1;
                    stats.write_retries.fetch_add(1, Ordering::Relaxed);
                    let wait = backoff_delay(&DEFAULT_BACKOFF, settings.max_backoff, failures + 1)
                        .max(Duration::from_millis(50));
                    tracing::warn!(processor = %settings.name, error = %e, retry_in = ?wait, "log write failed; holding the batch");
                    // Held, not dropped: on shutdown the messages stay unacknowledged and the
                    // broker delivers them again.
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(source) => {
                    return Err(Error::Log {
                        name: settings.name.clone(),
                        topic: batch[0].topic.clone(),
                        source,
                    });
                }
            }
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        for publish in batch.drain(..) {
            // The connection may have dropped meanwhile; the broker then redelivers, which the
            // store's dedup on event id absorbs.
            let _ = client.ack(&publish).await;
            stats.acknowledged.fetch_add(1, Ordering::Relaxed);
        }
    }
}
