//! The backend options of the network config and the peers' backend data, with upstream's names and
//! rules. Pure functions: everything here is read from the store and is untrusted.

use flannel_core::BackendError;
use flannel_core::gojson::GoObject;
use serde_json::Value;

/// The extension backend's options: four optional shell commands.
///
/// An empty string counts as unset, as upstream tests `len(cmd) > 0`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtensionOptions {
    /// `PreStartupCommand`: runs before the lease is acquired; its output (stdout and stderr,
    /// trimmed) is published as the lease's `BackendData`, a JSON string.
    pub pre_startup: Option<String>,
    /// `PostStartupCommand`: runs once the lease is held (`NETWORK`, `SUBNET`, `IPV6SUBNET`,
    /// `PUBLIC_IP`, `PUBLIC_IPV6` of this host in its environment).
    pub post_startup: Option<String>,
    /// `SubnetAddCommand`: runs for each peer lease that appears or changes (`SUBNET`, `IPV6SUBNET`,
    /// `PUBLIC_IP`, `PUBLIC_IPV6` of the peer; the peer's backend data on stdin).
    pub subnet_add: Option<String>,
    /// `SubnetRemoveCommand`: runs for each peer lease that goes away, with the same environment and
    /// stdin as the add command had.
    pub subnet_remove: Option<String>,
}

/// The longest command accepted (bytes): a command is a line of shell, not a program.
pub const MAX_COMMAND_LEN: usize = 64 * 1024;

impl ExtensionOptions {
    /// Reads the options from the network config's `Backend` object, as Go's `encoding/json` would
    /// (keys case-insensitive, unknown keys ignored, a non-string command is an error).
    ///
    /// # Errors
    /// [`BackendError::InvalidOptions`] naming the field and what it must hold.
    pub fn parse(backend: &Value) -> Result<Self, BackendError> {
        let bad = |m: String| BackendError::invalid("extension", m);
        let o = GoObject::new(backend, "Backend").map_err(|e| bad(e.to_string()))?;
        let command = |key: &str| -> Result<Option<String>, BackendError> {
            let Some(s) = o.string(key).map_err(|e| bad(e.to_string()))? else {
                return Ok(None);
            };
            if s.len() > MAX_COMMAND_LEN {
                return Err(bad(format!(
                    "Backend.{key} is {} bytes long, more than {MAX_COMMAND_LEN}; put the commands in a script and run that",
                    s.len()
                )));
            }
            if s.contains('\0') {
                return Err(bad(format!(
                    "Backend.{key} contains a NUL byte, which no command line can hold"
                )));
            }
            Ok((!s.trim().is_empty()).then(|| s.to_string()))
        };
        Ok(Self {
            pre_startup: command("PreStartupCommand")?,
            post_startup: command("PostStartupCommand")?,
            subnet_add: command("SubnetAddCommand")?,
            subnet_remove: command("SubnetRemoveCommand")?,
        })
    }
}

/// The `BackendData` this host publishes for `output`, the pre-startup command's output: a JSON
/// string, as upstream marshals it.
pub fn backend_data_of(output: &str) -> Value {
    Value::String(output.to_string())
}

/// What a peer's command gets on stdin for its `BackendData`: the JSON string's text (empty when the
/// peer published none).
///
/// # Errors
/// A description of what the peer published instead of a JSON string (upstream skips such a peer
/// with an error too).
pub fn peer_stdin(backend_data: Option<&Value>) -> Result<String, String> {
    match backend_data {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) if s.contains('\0') => {
            Err("its BackendData holds a NUL byte".to_string())
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "its BackendData is {}, not the JSON string an extension backend publishes",
            match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
                Value::Null | Value::String(_) => "a string",
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn upstream_names_any_case_and_empty_is_unset() {
        let o = ExtensionOptions::parse(&json!({
            "Type": "extension",
            "prestartupcommand": "cat /sys/class/net/eth0/address",
            "PostStartupCommand": "",
            "SubnetAddCommand": "ip route add \"$SUBNET\" via \"$PUBLIC_IP\"",
            "SubnetRemoveCommand": null,
            "Unknown": 3,
        }))
        .unwrap();
        assert_eq!(
            o.pre_startup.as_deref(),
            Some("cat /sys/class/net/eth0/address")
        );
        assert_eq!(o.post_startup, None);
        assert_eq!(
            o.subnet_add.as_deref(),
            Some("ip route add \"$SUBNET\" via \"$PUBLIC_IP\"")
        );
        assert_eq!(o.subnet_remove, None);
        assert_eq!(
            ExtensionOptions::parse(&json!({"Type": "extension"})).unwrap(),
            ExtensionOptions::default()
        );
    }

    #[test]
    fn wrong_types_and_sizes_are_named() {
        let cases = [
            (json!({"SubnetAddCommand": 5}), "Backend.SubnetAddCommand"),
            (
                json!({"PreStartupCommand": ["ls"]}),
                "Backend.PreStartupCommand",
            ),
            (
                json!({"PostStartupCommand": "x".repeat(MAX_COMMAND_LEN + 1)}),
                "put the commands in a script",
            ),
            (json!({"SubnetRemoveCommand": "a\u{0}b"}), "NUL"),
            (json!("extension"), "a JSON object"),
        ];
        for (v, want) in cases {
            let e = ExtensionOptions::parse(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{v}: {e}");
            assert!(e.contains("extension"), "{e}");
        }
    }

    #[test]
    fn backend_data_round_trips_as_a_json_string() {
        let data = backend_data_of("aa:bb:cc:dd:ee:ff\nline two");
        assert_eq!(data.to_string(), r#""aa:bb:cc:dd:ee:ff\nline two""#);
        assert_eq!(
            peer_stdin(Some(&data)).unwrap(),
            "aa:bb:cc:dd:ee:ff\nline two"
        );
        assert_eq!(peer_stdin(None).unwrap(), "");
        assert_eq!(peer_stdin(Some(&Value::Null)).unwrap(), "");
        for bad in [json!({"VtepMAC": "x"}), json!(1), json!([1]), json!(true)] {
            let e = peer_stdin(Some(&bad)).unwrap_err();
            assert!(e.contains("not the JSON string"), "{e}");
        }
        assert!(peer_stdin(Some(&json!("a\u{0}"))).is_err());
    }
}
