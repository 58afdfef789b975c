//! Real peer servers from Debian, started on loopback for a test on free
//! ports with their own temporary directories, and killed when dropped:
//! `nats-server -js` and `clickhouse-server`. When a binary is absent the
//! start answers `None` (and prints SKIPPED), unless `TALLY_REQUIRE_PEERS`
//! is set (CI sets it), where it fails.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn find(candidates: &[&str], package: &str) -> Option<PathBuf> {
    let found = candidates.iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("TALLY_REQUIRE_PEERS").is_none(),
            "{package} is not installed (apt-get install -y {package})"
        );
        eprintln!("SKIPPED: {package} is not installed (apt-get install -y {package})");
    }
    found
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `nats-server -js`.
pub struct Nats {
    binary: PathBuf,
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Option<Nats> {
        let binary = find(
            &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
            "nats-server",
        )?;
        let mut nats = Nats {
            binary,
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        nats.resume();
        Some(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (`kill -9`): what it acknowledged is on disk.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn resume(&mut self) {
        let mut child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        wait_for_port(self.port, "nats-server", &mut child);
        self.child = Some(child);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `clickhouse-server` with its HTTP interface on `http_port`.
pub struct ClickHouse {
    binary: PathBuf,
    child: Option<Child>,
    pub http_port: u16,
    dir: tempfile::TempDir,
}

fn clickhouse_config(dir: &Path, http_port: u16) -> String {
    let d = dir.display();
    format!(
        "<yandex>\n\
         <logger><level>warning</level><console>1</console></logger>\n\
         <http_port>{http_port}</http_port>\n\
         <tcp_port>{tcp}</tcp_port>\n\
         <listen_host>127.0.0.1</listen_host>\n\
         <path>{d}/data/</path>\n\
         <tmp_path>{d}/tmp/</tmp_path>\n\
         <user_files_path>{d}/user_files/</user_files_path>\n\
         <format_schema_path>{d}/format_schemas/</format_schema_path>\n\
         <mark_cache_size>67108864</mark_cache_size>\n\
         <users><default><password></password><networks><ip>127.0.0.1</ip></networks>\
         <profile>default</profile><quota>default</quota></default></users>\n\
         <profiles><default></default></profiles>\n\
         <quotas><default></default></quotas>\n\
         </yandex>\n",
        tcp = free_port(),
    )
}

impl ClickHouse {
    pub fn start() -> Option<ClickHouse> {
        let binary = find(
            &["/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"],
            "clickhouse-server",
        )?;
        let mut ch = ClickHouse {
            binary,
            child: None,
            http_port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
        };
        let config = clickhouse_config(ch.dir.path(), ch.http_port);
        std::fs::write(ch.dir.path().join("config.xml"), config).expect("writing config.xml");
        ch.resume();
        Some(ch)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (`kill -9`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        let mut child = Command::new(&self.binary)
            .arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("clickhouse-server starts");
        wait_for_port(self.http_port, "clickhouse-server", &mut child);
        self.child = Some(child);
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.kill();
    }
}
