//! The agent's clock, where the connection lifecycle input reads "now":
//! the system clock, or — for tests and replays — an instant read from a
//! file each time, so time moves only when the file says so.

use std::path::PathBuf;

/// Where the agent reads the current time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// The instant a file holds: Unix milliseconds or an RFC 3339
    /// timestamp, read again on every look.
    File(PathBuf),
}

impl Clock {
    /// Now, Unix ms.
    pub fn now_millis(&self) -> Result<i64, String> {
        match self {
            Clock::System => Ok(jiff::Timestamp::now().as_millisecond()),
            Clock::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading the clock file {}: {e}", path.display()))?;
                parse_instant(text.trim()).ok_or_else(|| {
                    format!(
                        "the clock file {} holds {:?}, neither Unix milliseconds nor an RFC 3339 timestamp",
                        path.display(),
                        text.trim()
                    )
                })
            }
        }
    }
}

fn parse_instant(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().or_else(|| {
        text.parse::<jiff::Timestamp>()
            .ok()
            .map(|t| t.as_millisecond())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_file_holds_milliseconds_or_a_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("now");
        let clock = Clock::File(path.clone());
        assert!(clock.now_millis().is_err(), "no file yet");
        std::fs::write(&path, "1714564800250\n").unwrap();
        assert_eq!(clock.now_millis(), Ok(1_714_564_800_250));
        std::fs::write(&path, "2024-05-01T12:00:00.250Z").unwrap();
        assert_eq!(clock.now_millis(), Ok(1_714_564_800_250));
        std::fs::write(&path, "soon").unwrap();
        assert!(clock.now_millis().unwrap_err().contains("soon"));
        assert!(Clock::System.now_millis().unwrap() > 1_714_564_800_000);
    }
}
