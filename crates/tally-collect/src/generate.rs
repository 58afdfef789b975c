//! A realistic Envoy Gateway access-log corpus, with the exact totals a
//! correct collector must report for it.
//!
//! Many routes and projects; HTTP/1.1, HTTP/2 and gRPC; 2xx–5xx; zero-byte
//! and multi-GiB responses; numbers written as numbers or strings; `-` for
//! absent values; wire-byte fields on some proxies; `project_name` stamped on
//! some routes only; out-of-order lines; malformed and unattributable lines;
//! long-lived WebSocket streams logged periodically (`DownstreamStart`,
//! `DownstreamPeriodic`, `DownstreamEnd` with cumulative counters).
//! The expected totals are computed from the generator's own choices, not by
//! parsing what it wrote.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::aggregate::Totals;
use crate::route::RouteKey;

const GIB: u64 = 1 << 30;

/// Shape of a corpus. Every choice is drawn from a PRNG seeded by `seed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorpusConfig {
    /// Same seed, same corpus.
    pub seed: u64,
    /// Lines to write, all kinds included.
    pub lines: u64,
    /// Distinct HTTPRoutes.
    pub routes: u32,
    /// Distinct namespaces (one project each).
    pub projects: u32,
    /// Event time of the first line, Unix ms.
    pub start_millis: i64,
    /// Average event-time step between lines, ms.
    pub step_millis: i64,
    /// Per mille of lines whose start_time is up to `max_delay_millis` early.
    pub late_per_mille: u32,
    /// How early a late line's start_time may be.
    pub max_delay_millis: i64,
    /// Per mille of malformed lines.
    pub malformed_per_mille: u32,
    /// Per mille of lines without an HTTPRoute.
    pub unattributable_per_mille: u32,
    /// Per mille of responses of 1–8 GiB.
    pub huge_per_mille: u32,
    /// Per mille of lines that open a long-lived stream (a `DownstreamStart`
    /// record followed by periodic records and an end record).
    pub streams_per_mille: u32,
    /// Lines between two records of one stream.
    pub stream_flush_every: u64,
}

impl Default for CorpusConfig {
    fn default() -> Self {
        CorpusConfig {
            seed: 1,
            lines: 10_000,
            routes: 50,
            projects: 10,
            start_millis: 1_714_564_800_000,
            step_millis: 20,
            late_per_mille: 20,
            max_delay_millis: 5 * 60_000,
            malformed_per_mille: 5,
            unattributable_per_mille: 5,
            huge_per_mille: 1,
            streams_per_mille: 2,
            stream_flush_every: 500,
        }
    }
}

/// What a correct collector must count for a corpus.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedTotals {
    /// Totals per HTTPRoute (and project).
    pub per_route: BTreeMap<RouteKey, Totals>,
    /// Totals per project.
    pub per_project: BTreeMap<String, Totals>,
    /// Lines that are not valid records.
    pub malformed: u64,
    /// Valid records without an HTTPRoute.
    pub unattributable: u64,
    /// Start records, which carry no usage of their own.
    pub skipped: u64,
    /// Every line written.
    pub lines: u64,
}

impl ExpectedTotals {
    fn add(&mut self, route: &RouteKey, totals: &Totals) {
        self.per_route.entry(route.clone()).or_default().add(totals);
        self.per_project
            .entry(route.project.clone())
            .or_default()
            .add(totals);
    }
}

struct RouteShape {
    key: RouteKey,
    route_name: String,
    stamps_project: bool,
    wire_bytes: bool,
    grpc: bool,
}

/// Streams corpus lines; [`CorpusGenerator::expected`] holds the totals of
/// the lines produced so far.
pub struct CorpusGenerator {
    config: CorpusConfig,
    rng: fastrand::Rng,
    routes: Vec<RouteShape>,
    produced: u64,
    expected: ExpectedTotals,
    streams: Vec<Stream>,
}

/// A long-lived stream and what its records have reported so far.
struct Stream {
    route: usize,
    id: u64,
    start_millis: i64,
    reported: Totals,
    records_left: u32,
    next_line: u64,
}

impl CorpusGenerator {
    /// A generator of `config.lines` lines.
    pub fn new(config: CorpusConfig) -> Self {
        let mut rng = fastrand::Rng::with_seed(config.seed);
        let projects = config.projects.max(1);
        let routes = (0..config.routes.max(1))
            .map(|i| {
                let project = i % projects;
                let namespace = format!("ns-{project}");
                let name = format!("route-{i}");
                let route_name = match rng.u8(0..3) {
                    0 => format!("httproute/{namespace}/{name}/rule/0"),
                    1 => format!("httproute/{namespace}/{name}/rule/1/match/0/{name}.example.com"),
                    _ => format!("httproute/{namespace}/{name}/rule/0/match/2/*"),
                };
                let stamps_project = rng.bool();
                let project = if stamps_project {
                    format!("project-{project}")
                } else {
                    namespace.clone()
                };
                RouteShape {
                    key: RouteKey {
                        project,
                        namespace,
                        name,
                    },
                    route_name,
                    stamps_project,
                    wire_bytes: rng.bool(),
                    grpc: rng.u8(0..5) == 0,
                }
            })
            .collect();
        CorpusGenerator {
            config,
            rng,
            routes,
            produced: 0,
            expected: ExpectedTotals::default(),
            streams: Vec::new(),
        }
    }

    /// Totals of every line produced so far.
    pub fn expected(&self) -> &ExpectedTotals {
        &self.expected
    }

    fn per_mille(&mut self, n: u32) -> bool {
        self.rng.u32(0..1000) < n
    }

    fn malformed_line(&mut self, at: &str) -> String {
        match self.rng.u8(0..4) {
            0 => format!(
                r#"{{"start_time":"{at}","route_name":"httproute/ns-0/route-0/rule/0","bytes_sent":"#
            ),
            1 => "upstream connect error or disconnect/reset before headers".to_owned(),
            2 => format!(
                r#"{{"start_time":"{at}","route_name":"httproute/ns-0/route-0/rule/0","bytes_sent":"12kB"}}"#
            ),
            _ => r#"{"start_time":"not a time","route_name":"httproute/ns-0/route-0/rule/0"}"#
                .to_owned(),
        }
    }

    fn number(&mut self, value: Option<u64>) -> String {
        match value {
            None => r#""-""#.to_owned(),
            Some(v) if self.rng.bool() => format!(r#""{v}""#),
            Some(v) => v.to_string(),
        }
    }

    fn request_line(&mut self, at: &str) -> String {
        let route = self.rng.usize(0..self.routes.len());
        let (stamps, wire, grpc) = {
            let r = &self.routes[route];
            (r.stamps_project, r.wire_bytes, r.grpc)
        };
        let code = if grpc {
            200
        } else {
            [200, 200, 200, 201, 204, 301, 304, 404, 429, 500, 503][self.rng.usize(0..11)]
        };
        let (method, path, protocol) = if grpc {
            ("POST", "/shop.v1.Cart/AddItem", "HTTP/2")
        } else {
            let protocol = if self.rng.bool() {
                "HTTP/1.1"
            } else {
                "HTTP/2"
            };
            (
                ["GET", "POST", "PUT", "DELETE"][self.rng.usize(0..4)],
                "/api/items?page=2",
                protocol,
            )
        };
        let body_received = if method == "GET" {
            0
        } else {
            self.rng.u64(0..64_000)
        };
        let body_sent = match code {
            204 | 304 => 0,
            _ if self.per_mille(self.config.huge_per_mille) => self.rng.u64(GIB..8 * GIB),
            _ => self.rng.u64(0..200_000),
        };
        let (wire_received, wire_sent) = if wire {
            let headers = self.rng.u64(80..900);
            (Some(body_received + headers), Some(body_sent + headers))
        } else {
            (None, None)
        };
        let duration = if self.rng.u8(0..50) == 0 {
            None
        } else {
            Some(self.rng.u64(0..3_000))
        };
        let totals = Totals {
            requests: 1,
            ingress_bytes: u128::from(wire_received.unwrap_or(body_received)),
            egress_bytes: u128::from(wire_sent.unwrap_or(body_sent)),
            connection_millis: u128::from(duration.unwrap_or(0)),
        };
        let key = self.routes[route].key.clone();
        self.expected.add(&key, &totals);
        let project = if stamps {
            format!(r#""{}""#, key.project)
        } else if self.rng.bool() {
            r#""-""#.to_owned()
        } else {
            "null".to_owned()
        };
        let id = self.rng.u128(..);
        let received = self.number(Some(body_received));
        let sent = self.number(Some(body_sent));
        let wire_fields = if wire {
            format!(
                r#","downstream_wire_bytes_received":{},"downstream_wire_bytes_sent":{}"#,
                self.number(wire_received),
                self.number(wire_sent)
            )
        } else {
            String::new()
        };
        let duration = self.number(duration);
        let route_name = &self.routes[route].route_name;
        let host = &key.name;
        format!(
            r#"{{"start_time":"{at}","method":"{method}","x-envoy-origin-path":"{path}","protocol":"{protocol}","response_code":"{code}","response_flags":"-","bytes_received":{received},"bytes_sent":{sent}{wire_fields},"duration":{duration},"x-envoy-upstream-service-time":"3","x-forwarded-for":"203.0.113.7","user-agent":"curl/8.5.0","x-request-id":"{id:032x}",":authority":"{host}.example.com","upstream_host":"10.0.3.7:8080","upstream_cluster":"httproute/{ns}/{host}/rule/0","route_name":"{route_name}","project_name":{project}}}"#,
            ns = key.namespace,
        )
    }
}

fn rfc3339(millis: i64) -> String {
    jiff::Timestamp::from_millisecond(millis)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

impl CorpusGenerator {
    fn start_stream(&mut self, at_millis: i64, at: &str) -> String {
        let route = self.rng.usize(0..self.routes.len());
        let id = self.rng.u64(..);
        let records_left = self.rng.u32(1..12);
        self.streams.push(Stream {
            route,
            id,
            start_millis: at_millis,
            reported: Totals::default(),
            records_left,
            next_line: self.produced + self.config.stream_flush_every,
        });
        self.expected.skipped += 1;
        self.stream_line("DownstreamStart", route, id, at, &Totals::default())
    }

    /// The next periodic (or last) record of a stream, at `at_millis`.
    fn stream_record(&mut self, index: usize, at_millis: i64) -> String {
        let flush_every = self.config.stream_flush_every;
        let (ingress, egress) = (self.rng.u64(0..5_000), self.rng.u64(0..500_000));
        let stream = &mut self.streams[index];
        stream.records_left -= 1;
        stream.next_line = self.produced + flush_every;
        let last = stream.records_left == 0;
        let duration = u64::try_from(at_millis - stream.start_millis)
            .unwrap_or(0)
            .max(stream.reported.connection_millis as u64);
        let now = Totals {
            requests: u64::from(last),
            ingress_bytes: stream.reported.ingress_bytes + u128::from(ingress),
            egress_bytes: stream.reported.egress_bytes + u128::from(egress),
            connection_millis: u128::from(duration),
        };
        let gained = Totals {
            requests: now.requests,
            ingress_bytes: now.ingress_bytes - stream.reported.ingress_bytes,
            egress_bytes: now.egress_bytes - stream.reported.egress_bytes,
            connection_millis: now.connection_millis - stream.reported.connection_millis,
        };
        stream.reported = now;
        let (route, id, start) = (stream.route, stream.id, rfc3339(stream.start_millis));
        if last {
            self.streams.swap_remove(index);
        }
        let key = self.routes[route].key.clone();
        self.expected.add(&key, &gained);
        let kind = if last {
            "DownstreamEnd"
        } else {
            "DownstreamPeriodic"
        };
        self.stream_line(kind, route, id, &start, &now)
    }

    fn stream_line(&self, kind: &str, route: usize, id: u64, start: &str, t: &Totals) -> String {
        let shape = &self.routes[route];
        let project = if shape.stamps_project {
            format!(r#""{}""#, shape.key.project)
        } else {
            r#""-""#.to_owned()
        };
        format!(
            r#"{{"start_time":"{start}","method":"GET","path":"/ws","protocol":"HTTP/1.1","response_code":"101","access_log_type":"{kind}","bytes_received":"{}","bytes_sent":"{}","duration":"{}","x-request-id":"ws-{id:016x}","connection_id":{},"route_name":"{}","project_name":{project}}}"#,
            t.ingress_bytes,
            t.egress_bytes,
            t.connection_millis,
            id % 100_000,
            shape.route_name
        )
    }
}

impl Iterator for CorpusGenerator {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.produced >= self.config.lines {
            return None;
        }
        let index = i64::try_from(self.produced).unwrap_or(i64::MAX);
        self.produced += 1;
        self.expected.lines += 1;
        let jitter = self.rng.i64(0..=self.config.step_millis.max(0));
        let mut at = self.config.start_millis + index * self.config.step_millis + jitter;
        if self.per_mille(self.config.late_per_mille) {
            at -= self.rng.i64(0..=self.config.max_delay_millis.max(0));
        }
        if let Some(due) = self
            .streams
            .iter()
            .position(|s| s.next_line < self.produced)
        {
            return Some(self.stream_record(due, at));
        }
        let at_millis = at;
        let at = rfc3339(at);
        if self.per_mille(self.config.streams_per_mille) {
            return Some(self.start_stream(at_millis, &at));
        }
        if self.per_mille(self.config.malformed_per_mille) {
            self.expected.malformed += 1;
            return Some(self.malformed_line(&at));
        }
        if self.per_mille(self.config.unattributable_per_mille) {
            self.expected.unattributable += 1;
            let route_name = if self.rng.bool() {
                "-"
            } else {
                "tcproute/ns-0/db/rule/0"
            };
            return Some(format!(
                r#"{{"start_time":"{at}","method":"GET","path":"/","protocol":"HTTP/1.1","response_code":"404","bytes_received":"0","bytes_sent":"9","duration":"1","route_name":"{route_name}"}}"#
            ));
        }
        Some(self.request_line(&at))
    }
}

/// Writes a corpus to `path` (a file that is rotated by rename to
/// `path.1`, `path.2`, ... every `rotate_every` lines, so the newest lines
/// are always in `path`) and returns its totals and the files in the order
/// they were written.
pub fn write_corpus(
    config: CorpusConfig,
    path: &Path,
    rotate_every: Option<u64>,
) -> io::Result<(ExpectedTotals, Vec<PathBuf>)> {
    let mut generator = CorpusGenerator::new(config);
    let mut out = BufWriter::new(File::create(path)?);
    let mut rotated = Vec::new();
    let mut in_file = 0;
    for line in generator.by_ref() {
        if rotate_every.is_some_and(|n| in_file >= n) {
            out.flush()?;
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{}", rotated.len() + 1));
            let target = PathBuf::from(name);
            fs::rename(path, &target)?;
            rotated.push(target);
            out = BufWriter::new(File::create(path)?);
            in_file = 0;
        }
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        in_file += 1;
    }
    out.flush()?;
    rotated.push(path.to_owned());
    Ok((generator.expected, rotated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{Aggregator, Meter, WindowConfig};

    #[test]
    fn same_seed_same_corpus() {
        let a: Vec<_> = CorpusGenerator::new(CorpusConfig::default())
            .take(100)
            .collect();
        let b: Vec<_> = CorpusGenerator::new(CorpusConfig::default())
            .take(100)
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn aggregator_reports_the_corpus_totals() {
        let config = CorpusConfig {
            lines: 20_000,
            huge_per_mille: 20,
            ..CorpusConfig::default()
        };
        let mut generator = CorpusGenerator::new(config);
        let mut aggregator = Aggregator::new(WindowConfig::default());
        let mut out = Vec::new();
        for line in generator.by_ref() {
            aggregator.push_line(line.as_bytes(), &mut out);
        }
        aggregator.flush(&mut out);
        let expected = generator.expected();
        assert!(expected.malformed > 0 && expected.unattributable > 0);
        assert_eq!(aggregator.diagnostics().malformed(), expected.malformed);
        assert_eq!(
            aggregator.diagnostics().unattributable(),
            expected.unattributable
        );
        assert!(expected.skipped > 0, "the corpus has streams");
        assert_eq!(aggregator.diagnostics().skipped(), expected.skipped);
        let mut per_project: BTreeMap<String, [u128; 4]> = BTreeMap::new();
        for usage in &out {
            per_project.entry(usage.route.project.clone()).or_default()[usage.meter as usize] +=
                usage.value;
        }
        assert_eq!(per_project.len(), expected.per_project.len());
        let mut huge = false;
        for (project, totals) in &expected.per_project {
            let got = per_project[project];
            assert_eq!(got[Meter::Requests as usize], u128::from(totals.requests));
            assert_eq!(got[Meter::IngressBytes as usize], totals.ingress_bytes);
            assert_eq!(got[Meter::EgressBytes as usize], totals.egress_bytes);
            huge |= totals.egress_bytes > u128::from(u32::MAX);
        }
        assert!(huge, "the corpus has multi-GiB responses");
    }

    #[test]
    fn rotation_writes_every_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let config = CorpusConfig {
            lines: 1000,
            ..CorpusConfig::default()
        };
        let (expected, files) = write_corpus(config, &path, Some(300)).unwrap();
        assert_eq!(files.len(), 4);
        let lines: usize = files
            .iter()
            .map(|f| fs::read_to_string(f).unwrap().lines().count())
            .sum();
        assert_eq!(lines as u64, expected.lines);
    }
}
