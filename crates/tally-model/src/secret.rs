//! `Secret` (`v1`): opaque values that other resources reference by
//! `secretRef`. Values arrive base64-encoded in `data` or as text in
//! `stringData` (which wins for a key in both, as in Kubernetes); they are
//! never shown again: [`redact`] is the only view that leaves Tally.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::Value;

use crate::resource::Manifest;

/// The values of a Secret, by key.
pub type SecretData = BTreeMap<String, String>;

/// Reads a Secret's values from `data` (base64) and `stringData` (text).
/// The error names the key, never the value.
pub fn secret_data(manifest: &Manifest) -> Result<SecretData, String> {
    let mut values = SecretData::new();
    let section = |field: &str| -> Result<Option<&serde_json::Map<String, Value>>, String> {
        match manifest.extra.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map)),
            Some(_) => Err(format!("{field} must be a map of key to value")),
        }
    };
    let check_key = |key: &str| {
        let ok = !key.is_empty()
            && key.len() <= 253
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "key {key:?} must be 1 to 253 letters, digits, '-', '_' or '.'"
            ))
        }
    };
    if let Some(data) = section("data")? {
        for (key, value) in data {
            check_key(key)?;
            let text = value
                .as_str()
                .ok_or_else(|| format!("data.{key} must be a base64 string"))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| format!("data.{key} is not valid base64"))?;
            let value = String::from_utf8(bytes)
                .map_err(|_| format!("data.{key} must decode to UTF-8 text"))?;
            values.insert(key.clone(), value);
        }
    }
    if let Some(data) = section("stringData")? {
        for (key, value) in data {
            check_key(key)?;
            let text = value
                .as_str()
                .ok_or_else(|| format!("stringData.{key} must be a string"))?;
            values.insert(key.clone(), text.to_owned());
        }
    }
    if values.is_empty() {
        return Err("a Secret needs at least one value in data or stringData \
                    (values are never shown, so re-applying `tally get` output cannot work)"
            .into());
    }
    Ok(values)
}

/// The Secret as it may be shown: its values removed, their keys listed in
/// `status.keys`.
pub fn redact(mut manifest: Manifest, keys: impl IntoIterator<Item = String>) -> Manifest {
    manifest.extra.remove("data");
    manifest.extra.remove("stringData");
    let keys: Vec<Value> = keys.into_iter().map(Value::String).collect();
    manifest.status = Some(serde_json::json!({ "keys": keys }));
    manifest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Manifest {
        Manifest::parse_documents(text).unwrap().remove(0)
    }

    #[test]
    fn reads_data_and_string_data() {
        let m = parse(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: k, namespace: n}\ntype: Opaque\n\
             data: {token: c2VjcmV0}\nstringData: {user: alice}\n",
        );
        let data = secret_data(&m).unwrap();
        assert_eq!(data["token"], "secret");
        assert_eq!(data["user"], "alice");
        let shown = serde_json::to_string(&redact(m, data.into_keys())).unwrap();
        assert!(
            !shown.contains("c2VjcmV0") && !shown.contains("alice"),
            "{shown}"
        );
        assert!(shown.contains("\"keys\":[\"token\",\"user\"]"), "{shown}");
    }

    #[test]
    fn errors_name_the_key_not_the_value() {
        let m = parse(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: k}\ndata: {token: '%%hunter2'}\n",
        );
        let err = secret_data(&m).unwrap_err();
        assert!(
            err.contains("data.token") && !err.contains("hunter2"),
            "{err}"
        );
        let empty = parse("apiVersion: v1\nkind: Secret\nmetadata: {name: k}\n");
        assert!(
            secret_data(&empty)
                .unwrap_err()
                .contains("at least one value")
        );
    }
}
