//! The MQTT transport: QoS 1 publishes over one rumqttc connection, acknowledgements counted
//! from the PUBACKs its event loop sees, reconnection with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, Request,
};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::encode::{mqtt_topic, write_mqtt};
use crate::pace::{Pacer, TICK};
use crate::{Counters, Ctx, DRAIN_TIMEOUT, Health, Outcome, backoff};

/// Publishes awaiting their PUBACK; plenty for a local broker at tens of thousands a second.
const INFLIGHT: u16 = 1_000;
/// Publishes queued for the event loop; when full, sending waits (the backpressure).
const CHANNEL: usize = 1_000;

/// A broker address from `mqtt://[user:pass@]host[:port]`.
#[derive(Debug, PartialEq)]
pub(crate) struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl BrokerUrl {
    pub(crate) fn parse(url: &str) -> Result<BrokerUrl> {
        let expected = "expected mqtt://[user:pass@]host[:port] (TLS is not supported)";
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .ok_or_else(|| anyhow!("{} is not an MQTT URL: {expected}", crate::scheme(url)))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, rest),
        };
        if hostport.contains(['/', '?', '#']) {
            bail!("MQTT URL has a path or query: {expected}");
        }
        let credentials = userinfo.map(|u| match u.split_once(':') {
            Some((user, pass)) => (user.to_owned(), pass.to_owned()),
            None => (u.to_owned(), String::new()),
        });
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| anyhow!("MQTT URL has an unclosed '[': {expected}"))?;
            (host, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            bail!("MQTT URL has no host: {expected}");
        }
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| anyhow!("MQTT URL has a bad port {p:?}: {expected}"))?,
            None => 1883,
        };
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            credentials,
        })
    }

    /// For messages: never the password.
    pub(crate) fn shown(&self) -> String {
        if self.host.contains(':') {
            format!("mqtt://[{}]:{}", self.host, self.port)
        } else {
            format!("mqtt://{}:{}", self.host, self.port)
        }
    }
}

pub(crate) async fn run(mut ctx: Ctx, url: &str) -> Result<Outcome> {
    let broker = BrokerUrl::parse(url)?;
    let shown = broker.shown();
    // Random, so two simulators against one broker do not take over each other's session.
    let client_id = format!("sluice-sim-{:08x}", rand::random::<u32>());
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(INFLIGHT)
        .set_clean_session(true)
        .set_max_packet_size(64 * 1024, 64 * 1024);
    if let Some((user, pass)) = &broker.credentials {
        options.set_credentials(user, pass);
    }
    let (client, eventloop) = AsyncClient::new(options, CHANNEL);
    // The driver outlives sending: it collects the acknowledgements of the drain.
    let done = CancellationToken::new();
    let driver = tokio::spawn(drive(
        eventloop,
        ctx.counters.clone(),
        ctx.health.clone(),
        ctx.sending.clone(),
        done.clone(),
        shown.clone(),
    ));

    let start = Instant::now();
    let mut pacer = Pacer::new(ctx.rate, start);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    'run: loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = ctx.sending.cancelled() => break,
        }
        for _ in 0..pacer.due(Instant::now()) {
            let event = ctx.emitter.next();
            let mut payload = Vec::with_capacity(320);
            write_mqtt(&event, &mut payload);
            let topic = mqtt_topic(&event);
            let copy = event.duplicate.then(|| (topic.clone(), payload.clone()));
            if !publish(&client, &ctx.sending, topic, payload).await {
                break 'run;
            }
            Counters::add(&ctx.counters.sent, 1);
            ctx.emitter.sent(&event);
            pacer.sent(1);
            if let Some((topic, payload)) = copy {
                if !publish(&client, &ctx.sending, topic, payload).await {
                    break 'run;
                }
                Counters::add(&ctx.counters.sent, 1);
                Counters::add(&ctx.counters.duplicates_sent, 1);
            }
        }
    }
    let sending_time = start.elapsed();
    ctx.sending.cancel();
    let stopped_early = ctx.stopped_early();

    // Drain: wait for the PUBACKs still due, unless the broker is gone or refused us.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while stopped_early.is_none()
        && ctx.counters.outstanding() > 0
        && ctx.health.failing_for().is_none()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if client.try_disconnect().is_ok() {
        // The driver ends when the DISCONNECT is written.
        let _ = tokio::time::timeout(Duration::from_secs(1), done.cancelled()).await;
    }
    done.cancel();
    if let Err(e) = driver.await {
        tracing::error!("the MQTT event loop task failed: {e}");
    }
    Ok(ctx.finish(sending_time))
}

/// Hands a QoS 1 publish to the event loop, waiting while its queue is full; false when sending
/// stopped first or the event loop is gone.
async fn publish(
    client: &AsyncClient,
    sending: &CancellationToken,
    topic: String,
    payload: Vec<u8>,
) -> bool {
    tokio::select! {
        r = client.publish(topic, QoS::AtLeastOnce, false, payload) => r.is_ok(),
        () = sending.cancelled() => false,
    }
}

/// Polls the event loop: counts PUBACKs, reconnects with backoff, and counts the publishes a
/// reconnection loses (a clean session does not resend them).
async fn drive(
    mut eventloop: EventLoop,
    counters: Arc<Counters>,
    health: Arc<Health>,
    sending: CancellationToken,
    done: CancellationToken,
    target: String,
) {
    let mut attempt = 0u32;
    let mut unacked = 0u64;
    loop {
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            () = done.cancelled() => return,
        };
        match polled {
            Ok(Event::Incoming(Packet::PubAck(_))) => Counters::add(&counters.acknowledged, 1),
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if attempt > 0 {
                    tracing::info!("reconnected to {target}");
                }
                if !ack.session_present && unacked > 0 {
                    tracing::warn!(
                        "{unacked} publishes not acknowledged before the connection dropped are lost"
                    );
                    Counters::add(&counters.failed, unacked);
                }
                unacked = 0;
                attempt = 0;
                health.ok();
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                done.cancel();
                return;
            }
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(
                code @ (ConnectReturnCode::BadUserNamePassword
                | ConnectReturnCode::NotAuthorized
                | ConnectReturnCode::BadClientId),
            )) => {
                let reason = format!("{target} refused the connection: {code:?}");
                health.note(reason.clone());
                health.set_fatal(reason);
                sending.cancel();
                return;
            }
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                // What the event loop will resend, or drop if the next session is new.
                unacked = eventloop
                    .pending
                    .iter()
                    .filter(|r| matches!(r, Request::Publish(_)))
                    .count() as u64;
                if attempt == 0 {
                    tracing::warn!("{target}: {e}; reconnecting");
                } else {
                    tracing::debug!("{target}: {e}; attempt {attempt}");
                }
                health.failure(format!("{target}: {e}"));
                let wait = backoff(attempt);
                attempt += 1;
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = done.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(url: &str) -> (String, u16, Option<(String, String)>) {
        let b = BrokerUrl::parse(url).unwrap();
        (b.host, b.port, b.credentials)
    }

    #[test]
    fn broker_urls() {
        assert_eq!(parsed("mqtt://localhost"), ("localhost".into(), 1883, None));
        assert_eq!(
            parsed("mqtt://127.0.0.1:11883/"),
            ("127.0.0.1".into(), 11883, None)
        );
        assert_eq!(
            parsed("mqtt://sim:s3cr:et@broker:1884"),
            (
                "broker".into(),
                1884,
                Some(("sim".into(), "s3cr:et".into()))
            )
        );
        assert_eq!(parsed("tcp://[::1]:1883"), ("::1".into(), 1883, None));
        for bad in [
            "http://broker:1883",
            "mqtts://broker",
            "mqtt://:1883",
            "mqtt://broker:x",
            "mqtt://broker/topic",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
        let shown = BrokerUrl::parse("mqtt://u:p@h:1").unwrap().shown();
        assert_eq!(shown, "mqtt://h:1");
    }
}
