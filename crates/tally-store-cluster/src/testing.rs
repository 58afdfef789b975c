//! Real peers for tests (feature `testing`, dev only): a `nats-server -js`
//! on loopback, on a port of its choosing, with its own temporary store.
//!
//! Debian's `nats-server` package provides it. A test calls
//! [`NatsServer::start_or_skip`]: without the binary it is skipped with a
//! message, unless `TALLY_REQUIRE_PEERS` is set (CI), where it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server -js`, killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    url: String,
    /// Holds the JetStream store and the ports file.
    dir: tempfile::TempDir,
}

/// Where Debian installs it, if it is not on `PATH`.
const DEBIAN_PATH: &str = "/usr/sbin/nats-server";

fn binary() -> Option<PathBuf> {
    let on_path = Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return Some(PathBuf::from("nats-server"));
    }
    Path::new(DEBIAN_PATH)
        .exists()
        .then(|| PathBuf::from(DEBIAN_PATH))
}

impl NatsServer {
    /// Starts a server, or `None` after saying why the test is skipped.
    /// Panics when `TALLY_REQUIRE_PEERS` is set and there is no
    /// `nats-server`, or when it does not start.
    pub fn start_or_skip() -> Option<NatsServer> {
        let Some(binary) = binary() else {
            assert!(
                std::env::var_os("TALLY_REQUIRE_PEERS").is_none(),
                "nats-server is not installed (apt-get install -y nats-server)"
            );
            eprintln!("SKIPPED: nats-server is not installed (apt-get install -y nats-server)");
            return None;
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut server = NatsServer {
            child: None,
            url: String::new(),
            dir,
        };
        server.launch(&binary, "-1");
        Some(server)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// store.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.url.rsplit(':').next().unwrap_or_default().to_owned();
        let binary = binary().expect("nats-server");
        self.launch(&binary, &port);
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn launch(&mut self, binary: &Path, port: &str) {
        let ports = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports);
        std::fs::create_dir_all(&ports).expect("the ports directory");
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", port, "-sd"])
            .arg(self.dir.path().join("jetstream"))
            .arg("--ports_file_dir")
            .arg(&ports)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        self.url = wait_for_ports_file(&ports);
        wait_for_jetstream(&self.url);
    }
}

/// The client URL the server wrote to its ports file.
fn wait_for_ports_file(dir: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = std::fs::read_dir(dir).ok().and_then(|entries| {
            entries.flatten().find_map(|entry| {
                let text = std::fs::read_to_string(entry.path()).ok()?;
                let ports: serde_json::Value = serde_json::from_str(&text).ok()?;
                ports["nats"][0].as_str().map(str::to_owned)
            })
        });
        if let Some(url) = found {
            return url;
        }
        assert!(Instant::now() < deadline, "nats-server wrote no ports file");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the server accepts connections.
fn wait_for_jetstream(url: &str) {
    let address = url.trim_start_matches("nats://").to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&address).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server at {url} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
