//! A loopback HTTP receiver with injectable faults, and a line encoder, for
//! the delivery tests and the throughput example.
//!
//! The wire format is the test sink's own: `POST /ingest`, body = one line
//! per item, `key<TAB>data` (gzip when `Content-Encoding: gzip`). The
//! receiver dedupes by key, as the real receivers (ledger, Amberflo) do.

use std::collections::{HashSet, VecDeque};
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tally_delivery::{EncodeError, Encoder, HttpRequest, Item};

/// What the receiver does with one request instead of accepting it.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer this status, with an optional `Retry-After` and a body.
    Status {
        status: u16,
        retry_after: Option<String>,
        body: String,
    },
    /// Wait this long, then accept (the client should time out first).
    Hang(Duration),
}

impl Fault {
    pub fn status(status: u16) -> Fault {
        Fault::Status {
            status,
            retry_after: None,
            body: String::new(),
        }
    }

    pub fn retry_after(status: u16, value: &str) -> Fault {
        Fault::Status {
            status,
            retry_after: Some(value.to_owned()),
            body: String::new(),
        }
    }

    pub fn with_body(status: u16, body: &str) -> Fault {
        Fault::Status {
            status,
            retry_after: None,
            body: body.to_owned(),
        }
    }
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub keys: Vec<String>,
    /// Bytes of key + data of every item.
    pub item_bytes: usize,
    pub status: u16,
    pub gzip: bool,
}

#[derive(Default)]
struct Shared {
    faults: Mutex<VecDeque<Fault>>,
    /// Applied to every request once `faults` is empty.
    always: Mutex<Option<Fault>>,
    /// Every `fail_every`-th request (when non-zero) answers 503.
    fail_every: AtomicU64,
    requests: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    unique: Mutex<HashSet<String>>,
    raw_items: AtomicU64,
    /// Keep `seen` (off for the benchmark).
    record: bool,
}

/// A running receiver.
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Option<(Vec<String>, usize, bool)> {
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v == "gzip");
    let text = if gzip {
        let mut out = String::new();
        flate2::read::GzDecoder::new(body)
            .read_to_string(&mut out)
            .ok()?;
        out
    } else {
        String::from_utf8(body.to_vec()).ok()?
    };
    let mut keys = Vec::new();
    let mut item_bytes = 0;
    for line in text.lines() {
        let (key, data) = line.split_once('\t')?;
        item_bytes += key.len() + data.len();
        keys.push(key.to_owned());
    }
    Some((keys, item_bytes, gzip))
}

async fn ingest(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let at = Instant::now();
    let Some((keys, item_bytes, gzip)) = parse_body(&headers, &body) else {
        return (StatusCode::BAD_REQUEST, "unreadable body").into_response();
    };
    let n = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let every = shared.fail_every.load(Ordering::SeqCst);
    let fault = shared.faults.lock().unwrap().pop_front().or_else(|| {
        if every > 0 && n % every == 0 {
            Some(Fault::status(503))
        } else {
            shared.always.lock().unwrap().clone()
        }
    });
    let mut status = 200;
    let mut response = StatusCode::OK.into_response();
    match fault {
        Some(Fault::Status {
            status: code,
            retry_after,
            body,
        }) => {
            status = code;
            response = (StatusCode::from_u16(code).unwrap(), body).into_response();
            if let Some(value) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, value.parse().unwrap());
            }
        }
        Some(Fault::Hang(wait)) => tokio::time::sleep(wait).await,
        None => {}
    }
    if status == 200 {
        shared
            .raw_items
            .fetch_add(keys.len() as u64, Ordering::SeqCst);
        let mut unique = shared.unique.lock().unwrap();
        unique.extend(keys.iter().cloned());
    }
    if shared.record {
        shared.seen.lock().unwrap().push(Seen {
            at,
            keys,
            item_bytes,
            status,
            gzip,
        });
    }
    response
}

impl Receiver {
    /// Starts a receiver on a free loopback port.
    pub async fn start() -> Receiver {
        Self::start_with(true).await
    }

    /// Starts a receiver that does not keep per-request records.
    pub async fn start_unrecorded() -> Receiver {
        Self::start_with(false).await
    }

    async fn start_with(record: bool) -> Receiver {
        let shared = Arc::new(Shared {
            record,
            ..Shared::default()
        });
        let app = axum::Router::new()
            .route("/ingest", axum::routing::post(ingest))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, shared, task }
    }

    pub fn url(&self) -> reqwest::Url {
        reqwest::Url::parse(&format!("http://{}/ingest", self.addr)).unwrap()
    }

    /// Faults for the next requests, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.faults.lock().unwrap().extend(faults);
    }

    /// A fault for every request after the queued ones (`None` heals).
    pub fn set_always(&self, fault: Option<Fault>) {
        *self.shared.always.lock().unwrap() = fault;
    }

    /// Every `n`-th request answers 503 (0: never).
    pub fn fail_every(&self, n: u64) {
        self.shared.fail_every.store(n, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn unique(&self) -> HashSet<String> {
        self.shared.unique.lock().unwrap().clone()
    }

    pub fn unique_count(&self) -> usize {
        self.shared.unique.lock().unwrap().len()
    }

    /// Items accepted, duplicates included.
    pub fn raw_items(&self) -> u64 {
        self.shared.raw_items.load(Ordering::SeqCst)
    }

    /// Waits until `n` distinct keys arrived, or panics after `limit`.
    pub async fn wait_for_unique(&self, n: usize, limit: Duration) {
        let start = Instant::now();
        while self.unique_count() < n {
            assert!(
                start.elapsed() < limit,
                "only {} of {n} items arrived in {limit:?}",
                self.unique_count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A URL on which nothing listens.
pub fn closed_port_url() -> reqwest::Url {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    reqwest::Url::parse(&format!("http://{addr}/ingest")).unwrap()
}

/// The test sink's encoder: `key<TAB>data` lines.
pub struct Lines {
    pub url: reqwest::Url,
    pub gzip: bool,
}

impl Lines {
    pub fn new(url: reqwest::Url) -> Lines {
        Lines { url, gzip: false }
    }
}

impl Encoder for Lines {
    fn encode(&self, items: &[Item]) -> Result<HttpRequest, EncodeError> {
        let mut body = Vec::with_capacity(items.iter().map(|i| i.size() + 2).sum());
        for item in items {
            body.extend_from_slice(&item.key);
            body.push(b'\t');
            body.extend_from_slice(&item.data);
            body.push(b'\n');
        }
        Ok(HttpRequest::post(self.url.clone())
            .body(body)
            .gzip(self.gzip))
    }
}

/// Item `i` of a test: key `k<i>`, `len` bytes of data.
pub fn item(i: usize, len: usize) -> Item {
    Item::new(format!("k{i}"), "d".repeat(len))
}
