//! Throughput of the delivery pipeline to a loopback receiver, and memory per
//! queued item.
//!
//! `cargo run --release -p tally-delivery --example throughput [ITEMS]`
//!
//! For each queue kind, ITEMS items (200 bytes of data, ~8-byte key) are
//! enqueued by 4 producers and delivered in batches of up to 1000 to a
//! receiver that parses every line and dedupes by key; the figure is items
//! per second from the first enqueue to the last item received. Then 200 000
//! items are queued for a receiver that never answers, and the growth of the
//! heap (counted by a wrapping global allocator) is divided by the item count.

use tally_testkit::line_receiver as support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::{Fault, Lines, Receiver};
use tally_delivery::{Item, Sink, SinkConfig, Storage};

const DATA_BYTES: usize = 200;

fn data() -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; DATA_BYTES])
}

fn config(storage: Storage) -> SinkConfig {
    let mut config = SinkConfig::new("bench");
    config.batch.max_items = 1000;
    config.batch.timeout = Duration::from_millis(10);
    config.queue.max_items = 1_000_000;
    config.queue.max_bytes = 1 << 30;
    config.queue.storage = storage;
    config
}

/// Enqueues `items` items with 4 producers, `chunk` items per call.
async fn produce(sink: &Arc<Sink>, items: usize, chunk: usize) {
    let producers = 4;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            let mine: Vec<usize> = (p..items).step_by(producers).collect();
            for group in mine.chunks(chunk) {
                let batch = group
                    .iter()
                    .map(|i| Item::new(format!("k{i}"), data()))
                    .collect();
                sink.enqueue_all(batch).await.expect("enqueue");
            }
        }));
    }
    for task in tasks {
        task.await.expect("producer");
    }
}

async fn throughput(name: &str, storage: Storage, items: usize, chunk: usize) {
    let receiver = Receiver::start_unrecorded().await;
    let sink = Arc::new(
        Sink::builder(config(storage), Lines::new(receiver.url()))
            .start()
            .expect("sink"),
    );
    let start = Instant::now();
    produce(&sink, items, chunk).await;
    let enqueued = start.elapsed();
    receiver
        .wait_for_unique(items, Duration::from_secs(600))
        .await;
    let elapsed = start.elapsed();
    println!(
        "{name:<34} {items:>8} items  enqueue {:>9.0}/s  end-to-end {:>9.0} items/s  ({:.2} s)",
        items as f64 / enqueued.as_secs_f64(),
        items as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    sink.shutdown(Duration::from_secs(5)).await;
}

/// The system allocator, counting the bytes in use.
struct Counting;

static HEAP_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is
// updated besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HEAP_BYTES.fetch_add(new_size, Ordering::Relaxed);
        HEAP_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap_bytes() -> usize {
    HEAP_BYTES.load(Ordering::Relaxed)
}

async fn memory_per_item(name: &str, storage: Storage) {
    let items = 200_000;
    let receiver = Receiver::start_unrecorded().await;
    receiver.set_always(Some(Fault::Hang(Duration::from_secs(3600))));
    let sink = Arc::new(
        Sink::builder(config(storage), Lines::new(receiver.url()))
            .start()
            .expect("sink"),
    );
    // Let the first batch go out (and hang) before measuring.
    sink.enqueue(Item::new("warm", data()))
        .await
        .expect("enqueue");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = heap_bytes();
    produce(&sink, items, 100).await;
    let after = heap_bytes();
    let per_item = after.saturating_sub(before) as f64 / items as f64;
    println!(
        "{name:<34} {items:>8} items queued: {per_item:>7.0} bytes of heap per item ({} of them key + data)",
        DATA_BYTES + 7
    );
    sink.shutdown(Duration::from_millis(10)).await;
}

#[tokio::main]
async fn main() {
    let items: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = |name: &str, sync: bool| Storage::Disk {
        path: dir.path().join(name),
        sync,
    };
    throughput("memory, 1 item per enqueue", Storage::Memory, items, 1).await;
    throughput("memory, 100 items per enqueue", Storage::Memory, items, 100).await;
    throughput("disk (no fsync), 1 per enqueue", disk("a", false), items, 1).await;
    throughput(
        "disk (no fsync), 100 per enqueue",
        disk("b", false),
        items,
        100,
    )
    .await;
    throughput(
        "disk (fsync), 1 per enqueue",
        disk("c", true),
        items / 50,
        1,
    )
    .await;
    throughput("disk (fsync), 100 per enqueue", disk("d", true), items, 100).await;
    memory_per_item("memory queue", Storage::Memory).await;
    memory_per_item("disk queue (no fsync)", disk("e", false)).await;
}
