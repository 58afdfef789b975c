//! What a compute `Instance` is allocated: the vCPUs and memory its spec
//! requests, where the platform's compute API puts them
//! (`spec.runtime.resources.requests.cpu` and `.memory`, Kubernetes
//! quantities such as `500m`, `2`, `512Mi`, `1G`, `1.5Gi`, `1e9`).
//!
//! `spec.runtime.resources.instanceType` (e.g. `datumcloud/d1-standard-2`)
//! names a catalog entry Tally does not hold, so only explicit `requests`
//! give an allocation; an instance without them has none (no gauge).
//! Other request names (`nvidia.com/gpu`...) are not read.
//!
//! **Invariant (bounded):** a quantity is at most [`MAX_QUANTITY_BYTES`]
//! long; vCPUs are in `[0.001, MAX_VCPUS]` and memory in `[1, MAX_MEMORY_BYTES]` bytes;
//! anything else is refused at apply, with the field named.

use serde_json::Value;

use crate::Manifest;

/// Most vCPUs one instance may request.
pub const MAX_VCPUS: f64 = 1024.0;
/// Most memory one instance may request: 64 TiB.
pub const MAX_MEMORY_BYTES: u64 = 64 << 40;
/// Longest quantity text read.
pub const MAX_QUANTITY_BYTES: usize = 64;

/// The vCPUs and memory an instance requests (each only if given).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Allocation {
    pub vcpus: Option<f64>,
    pub memory_bytes: Option<u64>,
}

impl Allocation {
    /// The allocation `spec.runtime.resources.requests` gives, checked
    /// against the bounds; `Ok(None)` when it requests neither.
    pub fn of(manifest: &Manifest) -> Result<Option<Allocation>, String> {
        let Some(requests) = manifest.spec.pointer("/runtime/resources/requests") else {
            return Ok(None);
        };
        let Value::Object(requests) = requests else {
            return Err(
                "spec.runtime.resources.requests must be a map of resource name to quantity"
                    .to_owned(),
            );
        };
        let bounded = |name: &str, low: f64, high: f64, unit: &str| {
            let Some(v) = requests.get(name) else {
                return Ok(None);
            };
            let field = format!("spec.runtime.resources.requests.{name}");
            let q = quantity(v).map_err(|e| format!("{field}: {e}"))?;
            if q < low || q > high {
                return Err(format!("{field}: {q} {unit} is outside [{low}, {high}]"));
            }
            Ok(Some(q))
        };
        // A vCPU request is at least one millicore, Kubernetes' finest.
        let vcpus = bounded("cpu", 0.001, MAX_VCPUS, "vCPUs")?;
        let memory = bounded("memory", 1.0, MAX_MEMORY_BYTES as f64, "bytes")?;
        let memory_bytes = memory.map(|q| q.ceil() as u64);
        Ok(
            (vcpus.is_some() || memory_bytes.is_some()).then_some(Allocation {
                vcpus,
                memory_bytes,
            }),
        )
    }
}

/// A Kubernetes quantity (a JSON number, or a string: a decimal number with
/// an optional exponent `e<n>` or suffix `n u m k M G T P E Ki Mi Gi Ti Pi
/// Ei`) as a finite `f64`.
pub fn quantity(value: &Value) -> Result<f64, String> {
    let text = match value {
        Value::Number(n) => return n.as_f64().ok_or_else(|| "not a number".to_owned()),
        Value::String(s) => s.as_str(),
        _ => return Err("a quantity is a number or a string such as \"2\" or \"512Mi\"".into()),
    };
    if text.len() > MAX_QUANTITY_BYTES {
        return Err(format!("longer than {MAX_QUANTITY_BYTES} bytes"));
    }
    let bad = || format!("{text:?} is not a quantity (e.g. \"500m\", \"2\", \"512Mi\", \"1G\")");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number.starts_with(['+', '-']) && number.len() == 1 {
        return Err(bad());
    }
    let number: f64 = number.parse().map_err(|_| bad())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exponent: i32 = e[1..].parse().map_err(|_| bad())?;
            if exponent.abs() > 30 {
                return Err(bad());
            }
            10f64.powi(exponent)
        }
        _ => return Err(bad()),
    };
    let q = number * multiplier;
    if q.is_finite() { Ok(q) } else { Err(bad()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn instance(requests: Value) -> Manifest {
        serde_json::from_value(json!({
            "apiVersion": "compute.datumapis.com/v1alpha",
            "kind": "Instance",
            "metadata": {"name": "web-0", "namespace": "acme"},
            "spec": {"runtime": {"resources": {
                "instanceType": "datumcloud/d1-standard-2", "requests": requests}}},
        }))
        .unwrap()
    }

    #[test]
    fn quantities_read_as_kubernetes_writes_them() {
        for (text, want) in [
            (json!("500m"), 0.5),
            (json!("2"), 2.0),
            (json!(4), 4.0),
            (json!(1.5), 1.5),
            (json!("512Mi"), 512.0 * 1024.0 * 1024.0),
            (json!("1G"), 1e9),
            (json!("1.5Gi"), 1.5 * 1024f64.powi(3)),
            (json!("1e3"), 1000.0),
            (json!("100k"), 100_000.0),
        ] {
            assert_eq!(quantity(&text).unwrap(), want, "{text}");
        }
        for bad in [
            json!(""),
            json!("Mi"),
            json!("2 cores"),
            json!("1Qi"),
            json!("1e400"),
            json!("-"),
            json!(true),
            json!("9".repeat(65)),
        ] {
            assert!(quantity(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_give_the_allocation_within_bounds() {
        let a = Allocation::of(&instance(json!({"cpu": "1500m", "memory": "2Gi"})))
            .unwrap()
            .unwrap();
        assert_eq!(a.vcpus, Some(1.5));
        assert_eq!(a.memory_bytes, Some(2 << 30));
        let only_memory = Allocation::of(&instance(json!({"memory": "1G", "nvidia.com/gpu": 1})))
            .unwrap()
            .unwrap();
        assert_eq!(
            (only_memory.vcpus, only_memory.memory_bytes),
            (None, Some(1_000_000_000))
        );
        assert_eq!(
            Allocation::of(&instance(json!({"nvidia.com/gpu": 1}))).unwrap(),
            None
        );
        let mut none = instance(json!({}));
        none.spec = json!({"runtime": {"resources": {"instanceType": "datumcloud/d1-standard-2"}}});
        assert_eq!(Allocation::of(&none).unwrap(), None);
        for (requests, field) in [
            (json!({"cpu": "0"}), "requests.cpu"),
            (json!({"cpu": "-1"}), "requests.cpu"),
            (json!({"cpu": "2000"}), "requests.cpu"),
            (json!({"cpu": "lots"}), "requests.cpu"),
            (json!({"memory": "65Ti"}), "requests.memory"),
            (json!({"memory": "0.5"}), "requests.memory"),
            (json!(["cpu"]), "requests must be a map"),
        ] {
            let err = Allocation::of(&instance(requests.clone())).unwrap_err();
            assert!(err.contains(field), "{requests}: {err}");
        }
    }
}
