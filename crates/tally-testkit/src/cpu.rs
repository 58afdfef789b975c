//! CPU time of this process, for benchmarks that report work per
//! CPU-second (insensitive to other processes' load on a shared host).

/// CPU seconds (user + system, all threads) this process used so far,
/// from `/proc/self/stat` (clock ticks of 10 ms); 0 where it cannot be read.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 (utime) and 15 (stime) of proc_pid_stat(5); `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn spinning_costs_cpu_time() {
        let before = super::cpu_seconds();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(super::cpu_seconds() > before, "{x}");
    }
}
