//! Delivery against real local HTTP receivers: outcomes, timeout, breaker, destination policy.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Receiver, SECRET, endpoint, endpoint_with};
use sluice_executor::breaker::State;
use sluice_executor::guard::MAX_REDIRECTS;
use sluice_executor::sign::verify;
use sluice_executor::{Breaker, Deliverer, Destinations, Refusal, Secret, Status};

fn deliverer(allow_hosts: &[&str], allow_private: bool) -> Deliverer {
    let hosts: Vec<String> = allow_hosts.iter().map(|h| h.to_string()).collect();
    Deliverer::new(Destinations::new(&hosts, allow_private).unwrap()).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const BODY: &[u8] = br#"{"action":"notify","device":"pump-7","score":0.93}"#;

#[tokio::test]
async fn delivers_a_signed_json_post() {
    let receiver = Receiver::start("127.0.0.1").await;
    let d = deliverer(&[], true);
    let attempt = d
        .attempt(&endpoint(&receiver.url("/ok")), "act_1", BODY)
        .await;
    assert_eq!(attempt.status, Status::Delivered, "{attempt:?}");
    assert_eq!(attempt.http_code, Some(200));
    assert_eq!(attempt.error, None);
    assert!(attempt.latency > Duration::ZERO);

    let got = receiver.requests();
    assert_eq!(got.len(), 1);
    let req = &got[0];
    assert_eq!(req.body.as_ref(), BODY);
    let header = |name: &str| req.headers.get(name).unwrap().to_str().unwrap().to_owned();
    assert_eq!(header("content-type"), "application/json");
    assert_eq!(header("webhook-id"), "act_1");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    verify(
        &Secret::parse(SECRET).unwrap(),
        "act_1",
        &header("webhook-timestamp"),
        &header("webhook-signature"),
        &req.body,
        now,
    )
    .expect("the signature verifies");
}

#[tokio::test]
async fn a_404_is_a_failure_that_is_not_retried() {
    let receiver = Receiver::start("127.0.0.1").await;
    let d = deliverer(&[], true);
    let attempt = d
        .attempt(&endpoint(&receiver.url("/missing")), "act_2", BODY)
        .await;
    assert_eq!(attempt.status, Status::Failed { retryable: false });
    assert_eq!(attempt.http_code, Some(404));
    let error = attempt.error.unwrap();
    assert!(
        error.contains("404") && error.contains("no such hook"),
        "{error}"
    );
    assert_eq!(receiver.hits(), 1);
}

#[tokio::test]
async fn a_slow_receiver_hits_the_timeout() {
    let receiver = Receiver::start("127.0.0.1").await;
    let d = deliverer(&[], true);
    let timeout = Duration::from_millis(300);
    let ep = endpoint_with(&receiver.url("/slow"), timeout, SECRET, Breaker::default());
    let attempt = d.attempt(&ep, "act_3", BODY).await;
    assert_eq!(
        attempt.status,
        Status::Failed { retryable: true },
        "{attempt:?}"
    );
    assert_eq!(attempt.http_code, None);
    assert!(
        attempt.error.as_deref().unwrap().contains("timed out"),
        "{attempt:?}"
    );
    assert!(attempt.latency >= timeout, "{:?}", attempt.latency);
    assert!(
        attempt.latency < Duration::from_secs(10),
        "{:?}",
        attempt.latency
    );
    assert_eq!(receiver.hits(), 1);
}

#[tokio::test]
async fn a_dead_endpoint_opens_the_breaker_and_a_probe_closes_it() {
    // A port with nothing listening: take one, then free it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);

    let d = deliverer(&[], true);
    let cooldown = Duration::from_secs(300);
    let ep = endpoint_with(
        &format!("http://{addr}/ok"),
        Duration::from_secs(5),
        SECRET,
        Breaker::new(5, cooldown),
    );
    let t0 = Instant::now();
    for i in 0..5 {
        let attempt = d.attempt_at(t0, &ep, "act_4", BODY).await;
        assert_eq!(
            attempt.status,
            Status::Failed { retryable: true },
            "{attempt:?}"
        );
        let error = attempt.error.unwrap();
        assert!(
            error.to_lowercase().contains("connection refused"),
            "{error}"
        );
        let open = matches!(ep.breaker().state(), State::Open { .. });
        assert_eq!(open, i == 4, "after {} failures", i + 1);
    }

    // The receiver comes back on the same port; the breaker does not know yet.
    let receiver = Receiver::serve(tokio::net::TcpListener::bind(addr).await.unwrap());
    let mut until = None;
    for later in [1, 60, 299] {
        let attempt = d
            .attempt_at(t0 + Duration::from_secs(later), &ep, "act_4", BODY)
            .await;
        let Status::ShortCircuited { until: u } = attempt.status else {
            panic!("expected a short circuit: {attempt:?}");
        };
        assert!(
            u >= t0 + cooldown,
            "the cooldown runs from the fifth failure"
        );
        assert_eq!(attempt.latency, Duration::ZERO);
        until = Some(u);
    }
    assert_eq!(receiver.hits(), 0, "short circuits send nothing");

    // After the cooldown one probe goes through; its success closes the breaker.
    let until = until.unwrap();
    let probe = d.attempt_at(until, &ep, "act_4", BODY).await;
    assert_eq!(probe.status, Status::Delivered, "{probe:?}");
    assert_eq!(receiver.hits(), 1);
    assert_eq!(ep.breaker().state(), State::Closed { failures: 0 });
    let next = d
        .attempt_at(until + Duration::from_secs(1), &ep, "act_5", BODY)
        .await;
    assert_eq!(next.status, Status::Delivered);
    assert_eq!(receiver.hits(), 2);
}

#[tokio::test]
async fn a_literal_private_address_is_refused_without_a_connection() {
    let receiver = Receiver::start("127.0.0.1").await;
    let d = deliverer(&[], false);
    let port = receiver.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/ok"),
        format!("http://[::ffff:127.0.0.1]:{port}/ok"),
    ] {
        let ep = endpoint(&url);
        let attempt = d.attempt(&ep, "act_6", BODY).await;
        let Status::Refused(Refusal::PrivateAddress { addr, how, .. }) = &attempt.status else {
            panic!("{url}: expected a refusal: {attempt:?}");
        };
        assert!(addr.to_canonical().is_loopback(), "{addr}");
        assert_eq!(*how, "is");
        assert!(attempt.error.unwrap().contains("allow_private: true"));
        assert_eq!(attempt.latency, Duration::ZERO);
        // A refusal before sending says nothing about the endpoint's health.
        assert_eq!(ep.breaker().state(), State::Closed { failures: 0 });
    }
    assert_eq!(receiver.hits(), 0);
}

#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused_at_connect() {
    let receiver = Receiver::start("127.0.0.1").await;
    let url = format!("http://localhost:{}/ok", receiver.addr.port());

    let strict = deliverer(&[], false);
    let ep = endpoint(&url);
    let attempt = strict.attempt(&ep, "act_7", BODY).await;
    let Status::Refused(Refusal::PrivateAddress { host, how, .. }) = &attempt.status else {
        panic!("expected a refusal by the resolver: {attempt:?}");
    };
    assert_eq!((host.as_str(), *how), ("localhost", "resolves to"));
    assert_eq!(receiver.hits(), 0);
    // Refused in flight: the destination is unusable, which the breaker counts.
    assert_eq!(ep.breaker().state(), State::Closed { failures: 1 });

    // The same name through the same resolver, with private addresses allowed, is delivered:
    // the refusal above came from the address check, not from a failure to resolve.
    let open = deliverer(&[], true);
    let attempt = open.attempt(&endpoint(&url), "act_7", BODY).await;
    assert_eq!(attempt.status, Status::Delivered, "{attempt:?}");
    assert_eq!(receiver.hits(), 1);
}

#[tokio::test]
async fn a_redirect_to_a_private_address_is_refused() {
    // The first hop is a loopback receiver the policy trusts by exact address, standing in for
    // a public host; the redirect target is another loopback address (its own receiver) that
    // is not trusted, with allow_private off.
    let first = Receiver::start("127.0.0.1").await;
    let target = Receiver::start("127.0.0.2").await;
    first.redirect_to(&target.url("/ok"));

    let strict = Destinations::new(&[], false)
        .unwrap()
        .trust_address(ip("127.0.0.1"));
    let d = Deliverer::new(strict.clone()).unwrap();
    let attempt = d
        .attempt(&endpoint(&first.url("/redirect")), "act_8", BODY)
        .await;
    let Status::Refused(Refusal::PrivateAddress { addr, .. }) = &attempt.status else {
        panic!("expected the redirect to be refused: {attempt:?}");
    };
    assert_eq!(*addr, ip("127.0.0.2"));
    let error = attempt.error.unwrap();
    assert!(
        error.contains("127.0.0.2") && error.contains("allow_private"),
        "{error}"
    );
    assert_eq!(first.hits(), 1);
    assert_eq!(target.hits(), 0, "the redirect was not followed");

    // Control: trusting the target too, the same redirect is followed and the signed body
    // arrives, so the refusal above was the policy's and nothing else's.
    let d = Deliverer::new(strict.trust_address(ip("127.0.0.2"))).unwrap();
    let attempt = d
        .attempt(&endpoint(&first.url("/redirect")), "act_8", BODY)
        .await;
    assert_eq!(attempt.status, Status::Delivered, "{attempt:?}");
    assert_eq!(target.hits(), 1);
    let got = &target.requests()[0];
    assert_eq!(got.body.as_ref(), BODY);
    assert!(got.headers.contains_key("webhook-signature"));
}

#[tokio::test]
async fn a_redirect_to_a_host_outside_allow_hosts_is_refused() {
    let receiver = Receiver::start("127.0.0.1").await;
    receiver.redirect_to(&format!("http://localhost:{}/ok", receiver.addr.port()));
    let d = deliverer(&["127.0.0.1"], true);
    let attempt = d
        .attempt(&endpoint(&receiver.url("/redirect")), "act_9", BODY)
        .await;
    assert_eq!(
        attempt.status,
        Status::Refused(Refusal::HostNotAllowed {
            host: "localhost".into()
        }),
        "{attempt:?}"
    );
    assert!(attempt.error.unwrap().contains("allow_hosts"));
    assert_eq!(receiver.hits(), 1, "only the first hop was requested");
}

#[tokio::test]
async fn redirects_are_limited() {
    let receiver = Receiver::start("127.0.0.1").await;
    let d = deliverer(&[], true);
    let attempt = d
        .attempt(&endpoint(&receiver.url("/loop")), "act_10", BODY)
        .await;
    assert_eq!(
        attempt.status,
        Status::Refused(Refusal::TooManyRedirects {
            limit: MAX_REDIRECTS
        }),
        "{attempt:?}"
    );
    assert_eq!(receiver.hits(), MAX_REDIRECTS + 1);
}
