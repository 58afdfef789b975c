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
