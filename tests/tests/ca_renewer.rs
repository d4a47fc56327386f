//! The renewal loop (`keyproof_ca::renewer`) against the real
//! `keyproof-ca serve`: bootstrap, renew short-lived SVIDs over and over, ride
//! out a CA outage longer than the renewal interval, and recover.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use keyproof_ca::client::{certified_key, CaClient};
use keyproof_ca::renewer::{self, Event, Handler, NewIdentity, RenewerConfig};
use keyproof_identity::keys::KeyType;
use keyproof_identity::SpiffeId;
use keyproof_tests::ca_server::{client, CaServer};
use keyproof_tests::{cmd, free_port, run_ok, TestCa};
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

const TD: &str = "prod.example.com";
const WEB: &str = "spiffe://prod.example.com/ns/default/sa/web";

#[derive(Default)]
struct Recorder {
    current: ArcSwap<Option<Arc<CertifiedKey>>>,
    log: Mutex<Vec<String>>,
}

impl Handler for Recorder {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().clone()
    }
    fn install(&self, id: NewIdentity) -> Result<(), String> {
        let ck = certified_key(id.chain, &id.key).map_err(|e| e.to_string())?;
        self.current.store(Arc::new(Some(Arc::new(ck))));
        Ok(())
    }
    fn install_bundle(&self, _bundle: Vec<CertificateDer<'static>>) -> Result<(), String> {
        Ok(())
    }
    fn event(&self, e: Event<'_>) {
        let line = match e {
            Event::Renewed { how, .. } => format!("ok:{how}"),
            Event::Failed { how, error, .. } => format!("fail:{how}:{error}"),
            Event::BundleUpdated { roots } => format!("bundle:{roots}"),
        };
        self.log.lock().unwrap().push(line);
    }
}

/// `keyproof-ca serve` on `port` with 9-second SVIDs, killed when dropped
/// so no test leaves one behind.
fn serve(ca: &TestCa, port: u16) -> CaServer {
    CaServer::start_on(ca, port, &["--ttl", "9s"])
}

/// Runs the renewer on `rt` with `client`, bootstrapping with the join
/// token in `token_file`; its events go to the returned recorder.
fn spawn_renewer(
    rt: &tokio::runtime::Runtime,
    client: CaClient,
    token_file: PathBuf,
) -> (Arc<Recorder>, tokio::task::JoinHandle<()>) {
    let rec = Arc::new(Recorder::default());
    let handler: Arc<dyn Handler> = rec.clone();
    let task = rt.spawn(renewer::run(
        RenewerConfig {
            client,
            spiffe_id: SpiffeId::parse(WEB).unwrap(),
            key_type: KeyType::EcdsaP256,
            bootstrap: renewer::Credential::JoinToken(token_file),
            bundle_refresh: Duration::from_secs(2),
        },
        handler,
    ));
    (rec, task)
}

#[test]
fn bootstraps_renews_and_recovers_from_an_outage() {
    let ca = TestCa::new(TD);
    let port = free_port();
    let server = serve(&ca, port);
    let token_file = ca.path("token");
    let token = run_ok(
        cmd("keyproof-ca")
            .args(["token", "create", "--dir"])
            .arg(&ca.dir)
            .args(["--spiffe-id", WEB]),
    );
    std::fs::write(&token_file, token).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (rec, _task) = spawn_renewer(&rt, client(&ca, port), token_file);
    let oks = |rec: &Recorder| {
        rec.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("ok:"))
            .count()
    };
    let wait_for = |n: usize, limit: Duration| {
        let start = Instant::now();
        while oks(&rec) < n {
            assert!(
                start.elapsed() < limit,
                "only {} issuances: {:?}",
                oks(&rec),
                rec.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // Bootstrap, then a renewal about 6 s later (2/3 of 9 s).
    wait_for(2, Duration::from_secs(15));
    {
        let log = rec.log.lock().unwrap();
        assert_eq!(log[0], "ok:bootstrap", "{log:?}");
        assert!(log.contains(&"ok:renew".to_string()), "{log:?}");
    }
    // The CA goes away for longer than a renewal interval.
    drop(server);
    let before = oks(&rec);
    let down = Instant::now();
    let failures = |rec: &Recorder| -> Vec<String> {
        rec.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("fail:renew"))
            .cloned()
            .collect()
    };
    // Down until renewal has failed at least twice: longer than the renewal
    // interval (6 s), shorter than the lifetime.
    while failures(&rec).len() < 2 {
        assert!(
            down.elapsed() < Duration::from_secs(12),
            "{:?}",
            rec.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        down.elapsed() > Duration::from_secs(4),
        "the CA was down for {:?}",
        down.elapsed()
    );
    let failures = failures(&rec);
    assert!(failures[0].contains("cannot reach the CA"), "{failures:?}");
    assert_eq!(oks(&rec), before);
    // It comes back; the renewer recovers on its own (backoff is at most a
    // few seconds at this point, well inside the remaining lifetime).
    let _server = serve(&ca, port);
    wait_for(before + 1, Duration::from_secs(10));
    let cert = rec.current().expect("an identity is held");
    let id = keyproof_identity::svid::check_leaf_der(&cert.cert[0]).unwrap();
    assert_eq!(id.as_str(), WEB);
}

#[test]
fn an_empty_or_multi_line_token_file_fails_locally_as_a_bootstrap() {
    let ca = TestCa::new(TD);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for (content, want) in [
        ("", "empty"),
        ("  \n\t\r\n", "empty"),
        ("kpt_one\nkpt_two\n", "must hold one token"),
    ] {
        let token_file = ca.path("token");
        std::fs::write(&token_file, content).unwrap();
        // Nothing listens there: a token sent would fail as unreachable.
        let (rec, task) = spawn_renewer(&rt, client(&ca, free_port()), token_file);
        let start = Instant::now();
        while rec.log.lock().unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(10), "{content:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        task.abort();
        let first = rec.log.lock().unwrap()[0].clone();
        assert!(
            first.starts_with("fail:bootstrap:join token file"),
            "{first}"
        );
        assert!(first.contains(want), "{content:?}: {first}");
    }
}
