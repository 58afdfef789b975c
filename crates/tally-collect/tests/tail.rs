//! The tailer through rename rotation, copytruncate, partial lines and
//! restarts from a checkpoint.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use tally_collect::tail::{FileTailer, TailCheckpoint};

fn append(path: &Path, text: &str) {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn read_all(tailer: &mut FileTailer) -> Vec<String> {
    let mut lines = Vec::new();
    tailer
        .read_lines(usize::MAX, |l| {
            lines.push(String::from_utf8(l.to_vec()).unwrap())
        })
        .unwrap();
    lines
}

/// A line long enough that files get a fingerprint.
fn long(n: usize) -> String {
    format!("line-{n:04}-{}\n", "x".repeat(300))
}

#[test]
fn partial_lines_wait_for_their_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    append(&path, "one\ntw");
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    assert_eq!(read_all(&mut tailer), ["one"]);
    assert_eq!(read_all(&mut tailer), Vec::<String>::new());
    append(&path, "o\nthree\n");
    assert_eq!(read_all(&mut tailer), ["two", "three"]);
    assert_eq!(tailer.checkpoint()[0].offset, 14);
}

#[test]
fn small_budget_reads_in_pieces_and_long_lines_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let big = "y".repeat(100_000);
    append(&path, &format!("a\n{big}\nb\n"));
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    let mut lines = Vec::new();
    for _ in 0..10 {
        tailer
            .read_lines(10, |l| lines.push(String::from_utf8(l.to_vec()).unwrap()))
            .unwrap();
    }
    assert_eq!(lines, ["a", big.as_str(), "b"]);
}

#[test]
fn rename_rotation_drains_the_old_file_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    append(&path, &(long(1) + &long(2)));
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    assert_eq!(read_all(&mut tailer).len(), 2);
    // The writer still appends to the renamed file (it holds it open),
    // including a last line without a newline, then reopens the path.
    fs::rename(&path, dir.path().join("access.log.1")).unwrap();
    append(
        &dir.path().join("access.log.1"),
        &(long(3) + "tail-no-newline"),
    );
    append(&path, &long(4));
    let lines = read_all(&mut tailer);
    let lines2 = read_all(&mut tailer);
    let all: Vec<_> = lines.iter().chain(&lines2).map(|l| &l[..9]).collect();
    assert_eq!(all, ["line-0003", "tail-no-n", "line-0004"]);
    let checkpoint = tailer.checkpoint();
    let reading = checkpoint.iter().filter(|p| !p.finished).count();
    assert_eq!(reading, 1, "the rotated file was let go");
    assert_eq!(checkpoint.len(), 2, "and is remembered as finished");
}

/// File times are coarse: a rotated file can carry the same modification
/// time as the one read before it. It must still be read, once, and a file
/// finished earlier must not be read again, whatever the times say.
#[test]
fn rotations_within_one_clock_tick_lose_nothing_and_repeat_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated = |n: usize| dir.path().join(format!("access.log.{n}"));
    append(&path, &long(1));
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    let mut seen = read_all(&mut tailer);
    // Two rotations between polls, every file given the same time.
    fs::rename(&path, rotated(1)).unwrap();
    append(&path, &long(2));
    fs::rename(&path, rotated(2)).unwrap();
    append(&path, &long(3));
    let same = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    for p in [rotated(1), rotated(2), path.clone()] {
        fs::File::options()
            .append(true)
            .open(&p)
            .unwrap()
            .set_modified(same)
            .unwrap();
    }
    seen.extend(read_all(&mut tailer));
    seen.extend(read_all(&mut tailer));
    // Restart from the checkpoint, then one more rotation at the same time.
    let checkpoint = tailer.checkpoint();
    let mut tailer = FileTailer::open(&path, &checkpoint).unwrap();
    fs::rename(&path, rotated(3)).unwrap();
    append(&path, &long(4));
    fs::File::options()
        .append(true)
        .open(&path)
        .unwrap()
        .set_modified(same)
        .unwrap();
    seen.extend(read_all(&mut tailer));
    seen.extend(read_all(&mut tailer));
    let ids: Vec<_> = seen.iter().map(|l| &l[..9]).collect();
    assert_eq!(ids, ["line-0001", "line-0002", "line-0003", "line-0004"]);
}

#[test]
fn copytruncate_reads_the_file_again_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    append(&path, &(long(1) + &long(2)));
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    assert_eq!(read_all(&mut tailer).len(), 2);
    fs::copy(&path, dir.path().join("access.log.1")).unwrap();
    File::create(&path).unwrap(); // truncate in place
    append(&path, &long(3));
    assert_eq!(read_all(&mut tailer), [long(3).trim_end()]);
    // Truncated and refilled past the old position before the next poll:
    // the fingerprint tells.
    fs::write(&path, long(7) + &long(8) + &long(9)).unwrap();
    let lines = read_all(&mut tailer);
    assert_eq!(lines.len(), 3, "{lines:?}");
}

#[test]
fn restart_resumes_exactly_even_after_a_rename_while_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    append(&path, &(long(1) + &long(2)));
    let checkpoint: TailCheckpoint = {
        let mut tailer = FileTailer::open(&path, &[]).unwrap();
        assert_eq!(read_all(&mut tailer).len(), 2);
        tailer.checkpoint()
    };
    append(&path, &long(3));
    fs::rename(&path, dir.path().join("access.log.1")).unwrap();
    append(&path, &long(4));
    let mut tailer = FileTailer::open(&path, &checkpoint).unwrap();
    let mut lines = read_all(&mut tailer);
    lines.extend(read_all(&mut tailer));
    assert_eq!(lines, [long(3).trim_end(), long(4).trim_end()]);
    assert!(tailer.lost_files().is_empty());
}

#[test]
fn a_reused_inode_with_other_content_is_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    append(&path, &(long(1) + &long(2)));
    let checkpoint = {
        let mut tailer = FileTailer::open(&path, &[]).unwrap();
        read_all(&mut tailer);
        tailer.checkpoint()
    };
    // Same inode, other first bytes: as if the inode were reused.
    fs::write(&path, long(5) + &long(6) + &long(7)).unwrap();
    let mut tailer = FileTailer::open(&path, &checkpoint).unwrap();
    assert_eq!(tailer.lost_files().len(), 1);
    assert_eq!(read_all(&mut tailer).len(), 3);
}

/// Every line the tailer has now, over as many reads as it takes.
fn drain(tailer: &mut FileTailer) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let more = read_all(tailer);
        if more.is_empty() {
            return lines;
        }
        lines.extend(more);
    }
}

#[test]
fn files_rotated_while_nobody_polled_are_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    append(&path, "a1\n");
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    assert_eq!(drain(&mut tailer), ["a1"]);
    let checkpoint = tailer.checkpoint();
    drop(tailer);
    // While the agent is down: two rotations by rename.
    append(&path, "a2\n");
    fs::rename(&path, dir.path().join("access.log.1")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    append(&path, "b1\n");
    fs::rename(&path, dir.path().join("access.log.2")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    append(&path, "c1\n");
    let mut tailer = FileTailer::open(&path, &checkpoint).unwrap();
    assert_eq!(drain(&mut tailer), ["a2", "b1", "c1"]);
}

#[test]
fn a_copytruncate_copy_is_not_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    append(&path, &long(1));
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    assert_eq!(drain(&mut tailer).len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::copy(&path, dir.path().join("access.log.1")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&path, &long(2));
    let lines = drain(&mut tailer);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("line-0002"));
}

#[test]
fn a_first_start_reads_rotated_siblings_oldest_first_and_skips_compressed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let sibling = |suffix: &str| dir.path().join(format!("access.log{suffix}"));
    // Written oldest first, as logrotate leaves them; all within one clock
    // tick possibly: the numbers then order them.
    fs::write(sibling(".3"), long(1)).unwrap();
    fs::write(sibling(".2"), long(2) + &long(3)).unwrap();
    fs::write(sibling(".1"), long(4)).unwrap();
    append(&path, &long(5));
    // Not read: compressed rotations and files that are not rotations.
    fs::write(sibling(".4.gz"), b"\x1f\x8b compressed\n").unwrap();
    fs::write(sibling(".bak"), long(90)).unwrap();
    fs::write(dir.path().join("other.log.1"), long(91)).unwrap();
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    let lines = drain(&mut tailer);
    let ids: Vec<_> = lines.iter().map(|l| &l[..9]).collect();
    assert_eq!(
        ids,
        [
            "line-0001",
            "line-0002",
            "line-0003",
            "line-0004",
            "line-0005"
        ]
    );
    // logrotate (create) renames every file one up and starts a new one:
    // nothing is read twice, and the new lines are read once.
    fs::rename(sibling(".3"), sibling(".4")).unwrap();
    fs::rename(sibling(".2"), sibling(".3")).unwrap();
    fs::rename(sibling(".1"), sibling(".2")).unwrap();
    fs::rename(&path, sibling(".1")).unwrap();
    append(&path, &long(6));
    let lines = drain(&mut tailer);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("line-0006"));
    // And after a restart from the checkpoint, nothing either.
    let mut tailer = FileTailer::open(&path, &tailer.checkpoint()).unwrap();
    assert!(drain(&mut tailer).is_empty());
}

#[test]
fn rotation_names() {
    use tally_collect::tail::rotated_sibling;
    for (suffix, want) in [
        (".1", Some(Some(1))),
        (".12", Some(Some(12))),
        ("-20240501", Some(Some(0))),
        (".2024-05-01", Some(Some(0))),
        ("_1", Some(Some(0))),
        (".1.gz", Some(None)),
        ("-20240501.xz", Some(None)),
        (".bak", None),
        ("", None),
        (".", None),
        ("1", None),
        (".1a", None),
        (".gz", None),
    ] {
        assert_eq!(rotated_sibling(suffix), want, "{suffix:?}");
    }
}

#[test]
fn copytruncate_reads_what_the_copy_holds_past_the_position_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    append(&path, &(long(1) + &long(2)));
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    assert_eq!(drain(&mut tailer).len(), 2);
    // Written after the last poll, then copied and truncated before the
    // next one (the race copytruncate always has): the copy still holds it.
    append(&path, &(long(3) + "tail-no-newline"));
    fs::copy(&path, dir.path().join("access.log.1")).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&path, &long(4));
    let lines = drain(&mut tailer);
    let ids: Vec<_> = lines.iter().map(|l| &l[..9]).collect();
    assert_eq!(ids, ["line-0003", "tail-no-n", "line-0004"]);
    // The copy is remembered: a later rename rotation does not read it again.
    fs::rename(
        dir.path().join("access.log.1"),
        dir.path().join("access.log.2"),
    )
    .unwrap();
    fs::rename(&path, dir.path().join("access.log.1")).unwrap();
    append(&path, &long(5));
    let lines = drain(&mut tailer);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("line-0005"));
}

#[test]
fn a_line_over_the_limit_is_cut_and_the_rest_skipped_even_before_its_newline() {
    use tally_collect::tail::MAX_LINE_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let exact = "e".repeat(MAX_LINE_BYTES);
    // A line 3 MiB past the limit whose newline has not arrived yet.
    let huge = "h".repeat(MAX_LINE_BYTES + 3 * 1024 * 1024);
    append(&path, &format!("{exact}\n{huge}"));
    let mut tailer = FileTailer::open(&path, &[]).unwrap();
    let lines = read_all(&mut tailer);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0], exact, "a line at the limit is kept whole");
    assert_eq!(lines[1], huge[..MAX_LINE_BYTES], "a longer one is cut");
    assert_eq!(tailer.cut_lines(), 1);
    // Everything read is consumed: the partial line is not held in memory.
    let written = (exact.len() + 1 + huge.len()) as u64;
    assert_eq!(tailer.checkpoint()[0].offset, written);
    assert!(tailer.checkpoint()[0].skipping);
    append(&path, &format!("{}\nnext\n", "h".repeat(5_000_000)));
    assert_eq!(read_all(&mut tailer), ["next"]);
    assert_eq!(tailer.cut_lines(), 1);
    assert!(!tailer.checkpoint()[0].skipping);
}

#[test]
fn skipping_a_cut_line_survives_small_budgets_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, "short\n0123456789abcdefghij");
    let mut tailer = FileTailer::open(&path, &[]).unwrap().with_max_line(10);
    let mut lines = Vec::new();
    for _ in 0..5 {
        tailer
            .read_lines(3, |l| lines.push(String::from_utf8(l.to_vec()).unwrap()))
            .unwrap();
    }
    assert_eq!(lines, ["short", "0123456789"]);
    let checkpoint: TailCheckpoint = tailer.checkpoint();
    let saved = serde_json::to_string(&checkpoint).unwrap();
    drop(tailer);
    append(&path, "klmnop\nafter\n");
    let checkpoint: TailCheckpoint = serde_json::from_str(&saved).unwrap();
    let mut tailer = FileTailer::open(&path, &checkpoint)
        .unwrap()
        .with_max_line(10);
    assert_eq!(read_all(&mut tailer), ["after"]);
}

#[test]
fn a_cut_falls_between_characters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    // 'é' is two bytes, at 4..6: a cut at 5 would split it.
    append(&path, "abcdéfgh\nok\n");
    let mut tailer = FileTailer::open(&path, &[]).unwrap().with_max_line(5);
    assert_eq!(read_all(&mut tailer), ["abcd", "ok"]);
    assert_eq!(tailer.cut_lines(), 1);
}

#[test]
fn a_rotated_file_let_go_with_a_long_unterminated_line_is_cut_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let first = long(1);
    append(&path, &first);
    let mut tailer = FileTailer::open(&path, &[]).unwrap().with_max_line(400);
    assert_eq!(read_all(&mut tailer), [first.trim_end()]);
    let tail = "t".repeat(2_000);
    append(&path, &tail);
    fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    append(&path, "new\n");
    let lines = drain(&mut tailer);
    assert_eq!(lines, [&tail[..400], "new"]);
    assert_eq!(tailer.cut_lines(), 1);
}
