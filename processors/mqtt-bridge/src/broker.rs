//! The MQTT broker `sluice dev` embeds (`rumqttd`), so devices and `mosquitto_pub` have
//! something to publish to without installing a broker.
//!
//! It keeps its state in memory and acknowledges a device's message on receipt: what it has
//! not yet handed to the bridge is lost if the process dies (`sluice dev` drains it on a clean
//! stop). Production runs an external broker with persistent sessions instead.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT payload the embedded broker takes; the log takes records up to 1 MiB.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// A running embedded broker. It lives as long as the process (rumqttd has no stop).
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts a broker listening on `addr` (port 0 picks a free port) for MQTT 3.1.1 clients, and returns once it accepts connections.
    pub fn start(addr: SocketAddr) -> std::io::Result<EmbeddedBroker> {
        // rumqttd logs a failed bind instead of returning it, so bind here first to report
        // a busy port, and to learn the port when 0 was asked for.
        let addr = TcpListener::bind(addr)?.local_addr()?;
        let server = |name: &str, listen: SocketAddr| ServerSettings {
            name: name.to_owned(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: MAX_PAYLOAD_BYTES,
                // The bridge acknowledges after each log write; a wide window keeps it busy.
                max_inflight_count: 5000,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 10_010,
                max_outgoing_packet_count: 1000,
                max_segment_size: 100 * 1024 * 1024,
                max_segment_count: 10,
                ..RouterConfig::default()
            },
            v4: Some(HashMap::from([("v4".to_owned(), server("v4", addr))])),
            ..Config::default()
        };
        std::thread::Builder::new()
            .name("mqtt-broker".to_owned())
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded MQTT broker stopped");
                }
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the embedded MQTT broker did not start listening on {addr}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(EmbeddedBroker { addr })
    }

    /// Where MQTT 3.1.1 clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `mqtt://` URL of [`EmbeddedBroker::addr`].
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}
