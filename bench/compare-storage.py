#!/usr/bin/env python3
"""Side by side: Tally's embedded ledger, PostgreSQL and ClickHouse on the
same events and the same two queries, in one run (issue 15).

    bench/compare-storage.py [--events N] [--tally PATH] [--runs R] [--subjects S]
                             [--systems tally,postgres,clickhouse] [--keep DIR]

1. `tally bench --write-events` writes N gateway-style usage events (10,000
   subjects, 4 types, 30 days; deterministic for a given --now) to one NDJSON
   file. Every system loads that file.
2. Tally: `tally bench --events-file` (the real HTTP server in process on a
   fresh store; 4 connections, batches of 1,000, fsync'd ack, exact dedupe;
   ingest timed until acknowledged AND materialised).
   PostgreSQL (Debian's, 15): `COPY` into a table with primary key
   (source, id), one transaction, then VACUUM ANALYZE. ClickHouse (Debian's
   18.16): OpenMeter's `om_events` MergeTree schema, JSONEachRow inserts of
   10,000 rows over 4 connections (no dedupe), then OPTIMIZE ... FINAL. Rows for COPY and JSONEachRow are converted from
   the NDJSON before the clock starts, as Tally's request bodies are.
3. Q1 = 30-day hourly SUM of `value` of `gateway.requests` for projects/p42;
   Q2 = 30-day daily SUM grouped by subject over all subjects; R runs each.
4. Disk after compaction/merge; peak memory of each server.
5. Prints one markdown table, and exits 1 if the systems' answers to Q1 or
   Q2 differ (every row compared exactly, as decimals).

Nothing is installed: missing servers are named with the package to install.
Each server runs on loopback on free ports in its own temporary directory,
which is removed at the end (unless --keep).
"""

import argparse
import concurrent.futures
import datetime as dt
import decimal
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

Q1_SUBJECT = "projects/p42"
METER_TYPE = "gateway.requests"


def fail(message, code=2):
    print(f"compare-storage: {message}", file=sys.stderr)
    sys.exit(code)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, what, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"{what} exited ({proc.returncode}) before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    fail(f"{what} did not listen on port {port} within {seconds} s")


def percentile(values, p):
    values = sorted(values)
    if not values:
        return 0.0
    return values[min(len(values) - 1, round((len(values) - 1) * p))]


# --- Memory: peak proportional set size of a process tree, sampled. -----

def tree_pids(root):
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the summed PSS of a process tree every 100 ms (PSS, not RSS:
    PostgreSQL's backends share its buffers, and RSS would count them in
    every backend)."""

    def __init__(self, root):
        self.root, self.peak_kib, self.stop = root, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            total = sum(pss_kib(p) for p in tree_pids(self.root))
            self.peak_kib = max(self.peak_kib, total)
            self.stop.wait(0.1)

    def finish(self):
        self.stop.set()
        self.thread.join()
        return self.peak_kib / 1024


# --- Answers: normalised and compared exactly. --------------------------

def epoch(text):
    """A window start in any of the systems' notations, as epoch seconds."""
    text = text.strip().replace("T", " ").replace("Z", "+00:00")
    if text.endswith("+00"):
        text += ":00"
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return int(value.timestamp())


def normalise(rows, per_subject=True):
    """Rows of (subject or None, window start, value) as a dict keyed by
    (subject, epoch seconds), values as exact decimals; zero sums are dropped (a system may or may
    not list empty windows). Without `per_subject` (Q1, one subject asked
    for) the subject is left out: Tally names it, SQL rows need not."""
    out = {}
    for subject, start, value in rows:
        value = decimal.Decimal(str(value))
        key = (subject if per_subject else None, epoch(str(start)))
        out[key] = out.get(key, 0) + value  # a repeated window adds up, and so shows
    return {k: v for k, v in out.items() if v != 0}


def compare(answers):
    """answers: {system: {"q1": rows, "q2": rows}}. Returns a list of
    mismatch descriptions (empty when every system agrees)."""
    problems = []
    systems = list(answers)
    for query in ("q1", "q2"):
        reference = systems[0]
        per_subject = query != "q1"
        base = normalise(answers[reference][query], per_subject)
        if not base:
            problems.append(f"{query}: {reference} answered no rows")
        for other in systems[1:]:
            theirs = normalise(answers[other][query], per_subject)
            if theirs == base:
                continue
            missing = sorted(set(base) - set(theirs), key=str)
            extra = sorted(set(theirs) - set(base), key=str)
            differ = sorted(
                (k for k in set(base) & set(theirs) if base[k] != theirs[k]), key=str
            )
            problems.append(
                f"{query}: {other} differs from {reference}: {len(missing)} rows missing "
                f"(e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]}), "
                f"{len(differ)} with another value (e.g. "
                f"{[(k, str(base[k]), str(theirs[k])) for k in differ[:2]]})"
            )
    return problems


# --- The events file, converted for each system before the clock. -------

def read_events(path):
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def pg_copy_text(value):
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def write_pg_rows(events_path, out_path):
    with open(out_path, "w") as out:
        for e in read_events(events_path):
            fields = [e["source"], e["id"], e["type"], e["subject"], e["time"],
                      json.dumps(e["data"], separators=(",", ":"))]
            out.write("\t".join(pg_copy_text(f) for f in fields) + "\n")


def ch_time(rfc3339):
    return dt.datetime.fromtimestamp(epoch(rfc3339), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def ch_bodies(events_path, batch, now):
    """JSONEachRow bodies of `batch` rows for om_events."""
    bodies, rows = [], []
    stamp = ch_time(now)
    for e in read_events(events_path):
        rows.append(json.dumps({
            "namespace": "default", "id": e["id"], "type": e["type"],
            "subject": e["subject"], "source": e["source"], "time": ch_time(e["time"]),
            "data": json.dumps(e["data"], separators=(",", ":")),
            "ingested_at": stamp, "stored_at": stamp,
        }, separators=(",", ":")))
        if len(rows) == batch:
            bodies.append(("\n".join(rows) + "\n").encode())
            rows = []
    if rows:
        bodies.append(("\n".join(rows) + "\n").encode())
    return bodies


# --- Tally ---------------------------------------------------------------

def run_tally(args, work, events_path, now):
    report_path = os.path.join(work, "tally-report.json")
    command = [args.tally, "bench", "--events-file", events_path, "--now", now,
               "--query-runs", str(args.runs), "--report-json", report_path,
               "--data-dir", os.path.join(work, "tally-store")]
    print("tally:", " ".join(command), file=sys.stderr)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    sys.stderr.write(done.stdout)
    if done.returncode != 0:
        fail(f"tally bench failed ({done.returncode})")
    with open(report_path) as f:
        r = json.load(f)
    ingest = r["ingest"]
    disk = r["disk_by_keyspace"]
    split = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in disk.items() if v)
    return {
        "system": "Tally embedded (HTTP, 4 connections, batches of 1,000, fsync'd ack, exact dedupe)",
        "ingest": ingest["materialised_events_per_s"],
        "ingest_note": f"until acked and materialised (acked alone: {ingest['acknowledged_events_per_s']:,.0f}/s; "
                       f"ack→materialised p99 {ingest['ack_to_materialised_p99_ms']:.0f} ms)",
        "q1": (r["q1"]["p50_ms"], r["q1"]["p99_ms"]),
        "q2": (r["q2"]["p50_ms"], r["q2"]["p99_ms"]),
        "timing": "HTTP round trip incl. the JSON answer",
        "disk_mib": r["disk_tables_bytes"] / 2**20,
        "disk_note": f"after compaction, tables only ({split} MiB); journal apart: "
                     f"{r['journal_bytes_before_compaction'] / 2**20:.0f} MiB before compaction",
        "rss_mib": r["peak_rss_mib"],
        "rss_note": f"peak RSS of the bench process, incl. {ingest['request_bodies_mib']} MiB of request bodies",
        "answers": {"q1": r["q1_rows"], "q2": r["q2_rows"]},
        "range": (r["from"], r["to"]),
    }


# --- PostgreSQL ------------------------------------------------------------

def pg_bin(args):
    for base in sorted(
        (os.path.join("/usr/lib/postgresql", v, "bin") for v in os.listdir("/usr/lib/postgresql")),
        reverse=True,
    ) if os.path.isdir("/usr/lib/postgresql") else []:
        if os.path.exists(os.path.join(base, "postgres")):
            return base
    fail("PostgreSQL not found: apt-get install -y postgresql (or leave it out with --systems)")


class Postgres:
    def __init__(self, work):
        self.bin = pg_bin(None)
        self.dir = os.path.join(work, "pg")
        os.makedirs(self.dir)
        self.port = free_port()
        # initdb and postgres refuse to run as root: run them as `postgres`.
        as_user = {}
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(work, 0o755)
            as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        self.data = os.path.join(self.dir, "data")
        subprocess.run([f"{self.bin}/initdb", "-D", self.data, "-U", "bench", "--auth=trust",
                        "-E", "UTF8", "--locale=C.UTF-8"],
                       check=True, stdout=subprocess.DEVNULL, **as_user)
        with open(os.path.join(self.dir, "log"), "w") as log:
            self.proc = subprocess.Popen(
                [f"{self.bin}/postgres", "-D", self.data, "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                 "-c", "TimeZone=UTC"],
                stdout=subprocess.DEVNULL, stderr=log, **as_user)
        wait_for_port(self.port, "postgres", self.proc)
        self.memory = PeakMemory(self.proc.pid)

    def psql(self, *extra, stdin=None, capture=True):
        command = [f"{self.bin}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "bench",
                   "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-X", "-q", *extra]
        done = subprocess.run(command, input=stdin, stdout=subprocess.PIPE if capture else None,
                              text=True)
        if done.returncode != 0:
            fail(f"psql {' '.join(extra)} failed ({done.returncode})")
        return done.stdout

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pg_queries(frm, to):
    value = "sum((data->>'value')::numeric)"
    where = f"type = '{METER_TYPE}' AND time >= '{frm}' AND time < '{to}'"
    q1 = (f"SELECT NULL, date_trunc('hour', time), {value} FROM events "
          f"WHERE {where} AND subject = '{Q1_SUBJECT}' GROUP BY 2 ORDER BY 2")
    q2 = (f"SELECT subject, date_trunc('day', time), {value} FROM events "
          f"WHERE {where} GROUP BY 1, 2 ORDER BY 1, 2")
    return q1, q2


def pg_timed(pg, query, runs):
    """Times `runs` runs in one psql session (`\\timing`: the statement's
    round trip over loopback, not the client's start); answers discarded."""
    script = "\\timing on\n\\o /dev/null\n" + (query + ";\n") * runs
    out = pg.psql(stdin=script)
    times = [float(l.split()[1]) for l in out.splitlines() if l.startswith("Time:")]
    if len(times) != runs:
        fail(f"psql printed {len(times)} timings for {runs} runs")
    return times


def pg_answer(pg, query):
    out = pg.psql("-A", "-t", "-F", "\t", "-c", query)
    return [(s or None, start, v) for s, start, v in (l.split("\t") for l in out.splitlines() if l)]


def run_postgres(args, work, events_path, frm, to, count):
    rows_path = os.path.join(work, "pg-rows.tsv")
    write_pg_rows(events_path, rows_path)
    os.chmod(rows_path, 0o644)
    pg = Postgres(work)
    try:
        pg.psql("-c", "CREATE TABLE events (source text NOT NULL, id text NOT NULL, type text NOT NULL, "
                      "subject text NOT NULL, time timestamptz NOT NULL, data jsonb NOT NULL, "
                      "PRIMARY KEY (source, id))")
        started = time.monotonic()
        pg.psql("-c", f"\\copy events FROM '{rows_path}'")
        elapsed = time.monotonic() - started
        stored = int(pg.psql("-A", "-t", "-c", "SELECT count(*) FROM events").strip())
        if stored != count:
            fail(f"PostgreSQL holds {stored} events, expected {count}", 1)
        pg.psql("-c", "VACUUM ANALYZE events")
        q1, q2 = pg_queries(frm, to)
        t1, t2 = pg_timed(pg, q1, args.runs), pg_timed(pg, q2, args.runs)
        answers = {"q1": pg_answer(pg, q1), "q2": pg_answer(pg, q2)}
        disk = int(pg.psql("-A", "-t", "-c", "SELECT pg_total_relation_size('events')").strip())
        version = pg.psql("-A", "-t", "-c", "SHOW server_version").strip().split()[0]
    finally:
        rss = pg.memory.finish()
        pg.stop()
    return {
        "system": f"PostgreSQL {version} (COPY, primary key (source, id), no other index)",
        "ingest": count / elapsed, "ingest_note": "one COPY via psql, committed",
        "q1": (percentile(t1, 0.5), percentile(t1, 0.99)),
        "q2": (percentile(t2, 0.5), percentile(t2, 0.99)),
        "timing": "psql \\timing: round trip over loopback, answer discarded",
        "disk_mib": disk / 2**20, "disk_note": "table + indexes + TOAST after VACUUM (WAL apart)",
        "rss_mib": rss, "rss_note": "peak PSS summed over postgres processes",
        "answers": answers,
    }


# --- ClickHouse -------------------------------------------------------------

CH_SCHEMA = """CREATE TABLE om_events (
    namespace String,
    id String,
    type LowCardinality(String),
    subject String,
    source String,
    time DateTime,
    data String,
    ingested_at DateTime,
    stored_at DateTime
) ENGINE = MergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (namespace, type, subject, toStartOfHour(time))"""


class ClickHouse:
    def __init__(self, work):
        binary = shutil.which("clickhouse-server") or (
            "/usr/sbin/clickhouse-server" if os.path.exists("/usr/sbin/clickhouse-server") else None)
        if not binary:
            fail("clickhouse-server not found: apt-get install -y clickhouse-server "
                 "(or leave it out with --systems)")
        self.dir = os.path.join(work, "ch")
        os.makedirs(self.dir)
        self.port = free_port()
        config = os.path.join(self.dir, "config.xml")
        with open(config, "w") as f:
            f.write(f"""<yandex>
<logger><level>warning</level><log>{self.dir}/log</log><errorlog>{self.dir}/err</errorlog></logger>
<http_port>{self.port}</http_port><tcp_port>{free_port()}</tcp_port>
<listen_host>127.0.0.1</listen_host><timezone>UTC</timezone>
<path>{self.dir}/data/</path><tmp_path>{self.dir}/tmp/</tmp_path>
<user_files_path>{self.dir}/user_files/</user_files_path>
<format_schema_path>{self.dir}/format_schemas/</format_schema_path>
<mark_cache_size>67108864</mark_cache_size>
<users><default><password></password><networks><ip>127.0.0.1</ip></networks>
<profile>default</profile><quota>default</quota></default></users>
<profiles><default></default></profiles><quotas><default></default></quotas>
</yandex>
""")
        self.proc = subprocess.Popen([binary, f"--config-file={config}"], cwd=self.dir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, "clickhouse-server", self.proc)
        self.memory = PeakMemory(self.proc.pid)
        for _ in range(100):  # the port opens before the server answers
            try:
                self.query("SELECT 1")
                break
            except RuntimeError:
                time.sleep(0.1)

    def query(self, sql, body=None, settings=""):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            if body is None:
                connection.request("POST", "/?" + settings, body=sql.encode())
            else:
                connection.request("POST", "/?query=" + urllib.parse.quote(sql), body=body)
            response = connection.getresponse()
            text = response.read().decode()
        except OSError as error:
            raise RuntimeError(str(error))
        finally:
            connection.close()
        if response.status != 200:
            raise RuntimeError(f"ClickHouse answered {response.status}: {text[:500]}")
        return text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ch_queries(frm, to):
    value = "sum(visitParamExtractUInt(data, 'value'))"
    where = (f"namespace = 'default' AND type = '{METER_TYPE}' "
             f"AND time >= toDateTime('{ch_time(frm)}') AND time < toDateTime('{ch_time(to)}')")
    q1 = (f"SELECT toStartOfHour(time) AS w, {value} AS v FROM om_events "
          f"WHERE {where} AND subject = '{Q1_SUBJECT}' GROUP BY w ORDER BY w")
    q2 = (f"SELECT subject, toStartOfDay(time) AS w, {value} AS v FROM om_events "
          f"WHERE {where} GROUP BY subject, w ORDER BY subject, w")
    return q1, q2


def ch_timed(ch, query, runs):
    """Server-side time: `statistics.elapsed` of FORMAT JSON."""
    times, rows = [], []
    for _ in range(runs):
        answer = json.loads(ch.query(query + " FORMAT JSON"))
        times.append(answer["statistics"]["elapsed"] * 1e3)
        rows = answer["data"]
    return times, rows


def ch_disk_after_merge(ch):
    """Merges each partition into one part; OPTIMIZE skips parts that a
    background merge holds, so it is repeated (at most a minute)."""
    for _ in range(60):
        partitions = ch.query("SELECT partition FROM system.parts WHERE table = 'om_events' "
                              "AND active GROUP BY partition HAVING count() > 1 FORMAT TSV").split()
        if not partitions:
            break
        for p in partitions:
            ch.query(f"OPTIMIZE TABLE om_events PARTITION {p} FINAL")
        time.sleep(1)
    parts = ch.query("SELECT count(), sum(bytes) FROM system.parts "
                     "WHERE table = 'om_events' AND active FORMAT TSV").split()
    return int(parts[0]), int(parts[1])


def run_clickhouse(args, work, events_path, frm, to, count, now):
    bodies = ch_bodies(events_path, 10_000, now)
    ch = ClickHouse(work)
    try:
        # 18.16 keeps LowCardinality behind a setting; later releases ignore it.
        ch.query(CH_SCHEMA, settings="allow_experimental_low_cardinality_type=1")
        insert = "INSERT INTO om_events FORMAT JSONEachRow"
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda b: ch.query(insert, body=b), bodies))
        elapsed = time.monotonic() - started
        stored = int(ch.query("SELECT count() FROM om_events").strip())
        if stored != count:
            fail(f"ClickHouse holds {stored} events, expected {count}", 1)
        # Merged first, as PostgreSQL is vacuumed first: unmerged, each of
        # the many small parts costs Q1 a granule of its own.
        part_count, disk = ch_disk_after_merge(ch)
        q1, q2 = ch_queries(frm, to)
        t1, r1 = ch_timed(ch, q1, args.runs)
        t2, r2 = ch_timed(ch, q2, args.runs)
        version = ch.query("SELECT version()").strip()
    finally:
        rss = ch.memory.finish()
        ch.stop()
    return {
        "system": f"ClickHouse {version} (OpenMeter's om_events, 10k-row JSONEachRow, 4 connections, no dedupe)",
        "ingest": count / elapsed, "ingest_note": "until the last insert answered (no fsync)",
        "q1": (percentile(t1, 0.5), percentile(t1, 0.99)),
        "q2": (percentile(t2, 0.5), percentile(t2, 0.99)),
        "timing": "server-side (statistics.elapsed)",
        "disk_mib": disk / 2**20, "disk_note": f"active parts after OPTIMIZE FINAL ({part_count} parts; queried after it)",
        "rss_mib": rss, "rss_note": "peak PSS of clickhouse-server",
        "answers": {"q1": [(None, r["w"], r["v"]) for r in r1],
                    "q2": [(r["subject"], r["w"], r["v"]) for r in r2]},
    }


# --- The run -----------------------------------------------------------------

def print_table(results, args, count, load):
    print(f"\n{count:,} events, {args.runs} runs of each query; load average before the run: {load}\n")
    print("| system | ingest events/s | Q1 p50 / p99 ms | Q2 p50 / p99 ms | disk MiB | peak memory MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['ingest']:,.0f} | {r['q1'][0]:.1f} / {r['q1'][1]:.1f} | "
              f"{r['q2'][0]:.1f} / {r['q2'][1]:.1f} | {r['disk_mib']:.1f} | {r['rss_mib']:.0f} |")
    print()
    for r in results:
        print(f"- {r['system'].split(' (')[0]}: ingest {r['ingest_note']}; queries: {r['timing']}; "
              f"disk: {r['disk_note']}; memory: {r['rss_note']}.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tally", default="target/release/tally")
    parser.add_argument("--runs", type=int, default=20, help="runs of each query (20+)")
    parser.add_argument("--subjects", type=int, default=10_000,
                        help="distinct subjects (Q1 asks for projects/p42: give at least 43; fewer for a tiny run)")
    parser.add_argument("--systems", default="tally,postgres,clickhouse")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = parser.parse_args()
    systems = args.systems.split(",")
    if not 1 <= args.events <= 10_000_000:
        fail("--events must be between 1 and 10,000,000 (the events file is read into memory)")
    if "tally" in systems and not os.access(args.tally, os.X_OK):
        fail(f"{args.tally} is not an executable: cargo build --release -p tally, or --tally PATH")
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    work = args.keep or tempfile.mkdtemp(prefix="compare-storage-")
    os.makedirs(work, exist_ok=True)
    try:
        now = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
        now = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        events_path = os.path.join(work, "events.ndjson")
        subprocess.run([args.tally, "bench", "--write-events", events_path, "--events",
                        str(args.events), "--subjects", str(args.subjects), "--now", now],
                       check=True)
        os.chmod(events_path, 0o644)
        # The range of both queries, as `tally bench` computes it.
        end = dt.datetime.fromisoformat(now.replace("Z", "+00:00"))
        frm = (end - dt.timedelta(days=31)).strftime("%Y-%m-%dT%H:%M:%SZ")
        to = (end + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        results = []
        if "tally" in systems:
            results.append(run_tally(args, work, events_path, now))
            if results[-1]["range"] != (frm, to):
                fail(f"tally bench queried {results[-1]['range']}, expected {(frm, to)}", 1)
        if "postgres" in systems:
            results.append(run_postgres(args, work, events_path, frm, to, args.events))
        if "clickhouse" in systems:
            results.append(run_clickhouse(args, work, events_path, frm, to, args.events, now))
        print_table(results, args, args.events, load)
        problems = compare({r["system"].split(" (")[0]: r["answers"] for r in results})
        if problems:
            print("\nANSWERS DIFFER:\n" + "\n".join(problems))
            return 1
        q1 = len(normalise(results[0]["answers"]["q1"]))
        q2 = len(normalise(results[0]["answers"]["q2"]))
        print(f"\nEvery system answered the same: Q1 {q1} rows, Q2 {q2} rows, compared exactly.")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
