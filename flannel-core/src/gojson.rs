//! Decoding JSON objects the way Go's `encoding/json` does.
//!
//! Go flannel reads every JSON document (network config, lease values, backend options) with
//! `encoding/json`, which matches object keys to struct fields **case-insensitively**, ignores unknown
//! keys, treats `null` as "leave unset" and rejects a value of the wrong JSON type. [`GoObject`] gives the
//! same semantics to Rust code, so a backend can read its options with:
//!
//! ```
//! use flannel_core::gojson::GoObject;
//! let options = serde_json::json!({"type": "vxlan", "vni": 4, "DirectRouting": true});
//! let obj = GoObject::new(&options, "Backend").unwrap();
//! assert_eq!(obj.uint("VNI").unwrap(), Some(4));
//! assert_eq!(obj.bool("directrouting").unwrap(), Some(true));
//! assert_eq!(obj.string("Port").unwrap(), None);
//! ```

use serde_json::{Map, Value};

/// A JSON value had the wrong type or shape for a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: expected {expected}, found {found}")]
pub struct FieldError {
    /// The field, qualified by its parent object (e.g. `Backend.VNI`).
    pub field: String,
    /// What the field must hold.
    pub expected: &'static str,
    /// A short description of what was found.
    pub found: String,
}

/// A JSON object whose keys are looked up case-insensitively, as Go's decoder does.
///
/// When several keys fold to the same name the last one in document order wins, like Go.
#[derive(Debug, Clone)]
pub struct GoObject {
    what: String,
    fields: Map<String, Value>,
}

impl GoObject {
    /// Wraps `value`, which must be a JSON object; `what` names it in error messages.
    pub fn new(value: &Value, what: &str) -> Result<Self, FieldError> {
        let Value::Object(map) = value else {
            return Err(FieldError {
                field: what.to_string(),
                expected: "a JSON object",
                found: describe(value),
            });
        };
        let mut fields = Map::new();
        for (k, v) in map {
            fields.insert(k.to_lowercase(), v.clone());
        }
        Ok(Self {
            what: what.to_string(),
            fields,
        })
    }

    /// The raw value under `key`, `None` when absent or `null`.
    pub fn value(&self, key: &str) -> Option<&Value> {
        match self.fields.get(&key.to_lowercase()) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// Whether `key` is present with any value, `null` included.
    pub fn contains(&self, key: &str) -> bool {
        self.fields.contains_key(&key.to_lowercase())
    }

    fn err(&self, key: &str, expected: &'static str, v: &Value) -> FieldError {
        FieldError {
            field: format!("{}.{}", self.what, key),
            expected,
            found: describe(v),
        }
    }

    /// A boolean field.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, FieldError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, "true or false", v)),
        }
    }

    /// An unsigned integer field (Go `uint`): negative numbers, fractions and strings are errors.
    pub fn uint(&self, key: &str) -> Result<Option<u64>, FieldError> {
        match self.value(key) {
            None => Ok(None),
            Some(v @ Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.err(key, "a non-negative whole number", v)),
            Some(v) => Err(self.err(key, "a non-negative whole number", v)),
        }
    }

    /// A signed integer field (Go `int`).
    pub fn int(&self, key: &str) -> Result<Option<i64>, FieldError> {
        match self.value(key) {
            None => Ok(None),
            Some(v @ Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(key, "a whole number", v)),
            Some(v) => Err(self.err(key, "a whole number", v)),
        }
    }

    /// A string field.
    pub fn string(&self, key: &str) -> Result<Option<&str>, FieldError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, "a string", v)),
        }
    }

    /// A string field that must be present even when `null` is given (Go value types such as
    /// `ip.IP4` reject `null`). Absent keys give `None`.
    pub fn strict_string(&self, key: &str) -> Result<Option<&str>, FieldError> {
        match self.fields.get(&key.to_lowercase()) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, "a string", v)),
        }
    }

    /// A string field parsed with `parse`; a parse failure is reported as `expected`.
    pub fn parsed<T>(
        &self,
        key: &str,
        expected: &'static str,
        strict_null: bool,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, FieldError> {
        let s = if strict_null {
            self.strict_string(key)
        } else {
            self.string(key)
        }
        .map_err(|e| FieldError { expected, ..e })?;
        match s {
            None => Ok(None),
            Some(s) => parse(s).map(Some).ok_or_else(|| FieldError {
                field: format!("{}.{}", self.what, key),
                expected,
                found: format!("{s:?}"),
            }),
        }
    }
}

/// A short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// The kind of one value in [`canonical_fields`]' shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Canonical {
    /// A string without escapes; its text between the quotes is given.
    Str,
    /// A whole number of at most 19 digits without a leading zero (so it fits a `u64`).
    Uint,
}

/// The values of a compact JSON object with exactly these keys, in this order, read straight
/// from its text without building a tree: `shape` pairs each key with its value's kind. For the
/// canonical backend data flanneld and Go's flanneld write, which every reconcile pass decodes for
/// every peer (the general way, [`GoObject`] over a parsed tree, was a sixth of a 20,000-peer
/// pass). `None` for any other text (other spacing, order or case of keys, escapes, other kinds of
/// values), which the caller decodes the general way; where this answers, the values are what
/// [`GoObject`] gives for the same keys.
///
/// ```
/// use flannel_core::gojson::{Canonical, canonical_fields};
/// let shape = [("VNI", Canonical::Uint), ("VtepMAC", Canonical::Str)];
/// let text = r#"{"VNI":1,"VtepMAC":"0a:0b:0c:0d:0e:0f"}"#;
/// assert_eq!(canonical_fields(text, shape), Some(["1", "0a:0b:0c:0d:0e:0f"]));
/// assert_eq!(canonical_fields(r#"{"VNI": 1,"VtepMAC":"x"}"#, shape), None);
/// ```
pub fn canonical_fields<'a, const N: usize>(
    text: &'a str,
    shape: [(&str, Canonical); N],
) -> Option<[&'a str; N]> {
    let mut out = [""; N];
    let mut rest = text.strip_prefix('{')?;
    for (i, (key, kind)) in shape.into_iter().enumerate() {
        if i > 0 {
            rest = rest.strip_prefix(',')?;
        }
        rest = rest
            .strip_prefix('"')?
            .strip_prefix(key)?
            .strip_prefix("\":")?;
        let (value, after) = match kind {
            Canonical::Str => {
                let (value, after) = rest.strip_prefix('"')?.split_once('"')?;
                if value.contains('\\') {
                    return None;
                }
                (value, after)
            }
            Canonical::Uint => {
                let end = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                let digits = &rest[..end];
                let plain = !digits.is_empty()
                    && digits.len() <= 19
                    && (digits == "0" || !digits.starts_with('0'));
                if !plain {
                    return None;
                }
                (digits, &rest[end..])
            }
        };
        out[i] = value;
        rest = after;
    }
    (rest == "}").then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_fold_and_last_wins() {
        let v: Value = serde_json::from_str(r#"{"VNI": 1, "vni": 2}"#).unwrap();
        let o = GoObject::new(&v, "Backend").unwrap();
        assert_eq!(o.uint("Vni").unwrap(), Some(2));
    }

    #[test]
    fn wrong_types_are_errors() {
        let o = GoObject::new(&json!({"a": "24", "b": -1, "c": 2.5, "d": 1}), "X").unwrap();
        let e = o.uint("a").unwrap_err();
        assert_eq!(e.field, "X.a");
        assert!(o.uint("b").is_err());
        assert!(o.uint("c").is_err());
        assert!(o.bool("d").is_err());
        assert!(o.string("d").is_err());
    }

    #[test]
    fn null_is_unset_except_strict() {
        let o = GoObject::new(&json!({"a": null}), "X").unwrap();
        assert_eq!(o.uint("a").unwrap(), None);
        assert!(o.contains("A"));
        assert!(o.strict_string("a").is_err());
        assert!(GoObject::new(&json!([1]), "X").is_err());
    }

    #[test]
    fn canonical_fields_answer_only_for_the_exact_shape() {
        let shape = [("PublicKey", Canonical::Str), ("Port", Canonical::Uint)];
        let ok = r#"{"PublicKey":"abc=","Port":51820}"#;
        assert_eq!(canonical_fields(ok, shape), Some(["abc=", "51820"]));
        assert_eq!(
            canonical_fields(r#"{"PublicKey":"","Port":0}"#, shape),
            Some(["", "0"])
        );
        for other in [
            r#"{"Port":51820,"PublicKey":"abc="}"#,
            r#"{"publickey":"abc=","Port":51820}"#,
            r#"{"PublicKey":"a\"b","Port":1}"#,
            r#"{"PublicKey":"abc=","Port":051820}"#,
            r#"{"PublicKey":"abc=","Port":-1}"#,
            r#"{"PublicKey":"abc=","Port":1.5}"#,
            r#"{"PublicKey":"abc=","Port":"1"}"#,
            r#"{"PublicKey":"abc=","Port":}"#,
            r#"{"PublicKey":"abc=","Port":12345678901234567890}"#,
            r#"{"PublicKey":"abc=","Port":1,"x":2}"#,
            r#"{"PublicKey":"abc=","Port":1} "#,
            r#"{"PublicKey":"abc=", "Port":1}"#,
            r#"{"PublicKeyX":"abc=","Port":1}"#,
            r#"{"PublicKey":"abc="}"#,
            "",
        ] {
            assert_eq!(canonical_fields(other, shape), None, "{other}");
        }
    }
}
