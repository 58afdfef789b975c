//! Real peer servers from Debian, started on loopback for a test on free
//! ports with their own temporary directories, and killed when dropped:
//! `nats-server -js` and `clickhouse-server`. When a binary is absent the
//! start answers `None` (and prints SKIPPED), unless `TALLY_REQUIRE_PEERS`
//! is set (CI sets it), where it fails.

use std::ffi::OsString;
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

/// A peer server process on a port of its own, with its own temporary
/// directory; killed when dropped.
struct Process {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Process {
    fn new(binary: PathBuf) -> Process {
        Process {
            binary,
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    /// Starts the binary with `args` and waits until it listens on `port`.
    fn spawn(&mut self, args: &[OsString], what: &str) {
        let mut child = Command::new(&self.binary)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what} starts: {e}"));
        wait_for_port(self.port, what, &mut child);
        self.child = Some(child);
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `nats-server -js`.
pub struct Nats {
    process: Process,
    pub port: u16,
}

impl Nats {
    pub fn start() -> Option<Nats> {
        let binary = find(
            &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
            "nats-server",
        )?;
        let process = Process::new(binary);
        let mut nats = Nats {
            port: process.port,
            process,
        };
        nats.resume();
        Some(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Kills the server (`kill -9`): what it acknowledged is on disk.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port and store.
    pub fn resume(&mut self) {
        let mut args: Vec<OsString> = [
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-sd",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push(self.process.dir.path().into());
        self.process.spawn(&args, "nats-server");
    }
}

/// A running `clickhouse-server` with its HTTP interface on `http_port`.
pub struct ClickHouse {
    process: Process,
    pub http_port: u16,
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
        let process = Process::new(binary);
        let config = clickhouse_config(process.dir.path(), process.port);
        std::fs::write(process.dir.path().join("config.xml"), config).expect("writing config.xml");
        let mut ch = ClickHouse {
            http_port: process.port,
            process,
        };
        ch.resume();
        Some(ch)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Kills the server (`kill -9`).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port and data.
    pub fn resume(&mut self) {
        let config = self.process.dir.path().join("config.xml");
        let arg = OsString::from(format!("--config-file={}", config.display()));
        self.process.spawn(&[arg], "clickhouse-server");
    }
}
