//! The `flannel` CNI plugin: delegates to `bridge` + `host-local` with the host's flannel subnet.
//! Install it as `/opt/cni/bin/flannel` next to the reference plugins.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use flanneld::cni::{
    CniError, delegate_config, parse_netconf, read_subnet_env, validate_container_id,
    version_result,
};

fn fail(e: &CniError, version: &str) -> ExitCode {
    println!("{}", e.to_json(version));
    ExitCode::from(1)
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name).map_err(|_| CniError {
        code: 4,
        msg: format!("{name} is not set"),
        details: "the container runtime must set it".into(),
    })
}

/// Runs the delegate plugin with `config` on stdin; returns its stdout or its error result.
fn delegate(config: &serde_json::Value) -> Result<String, (CniError, Option<String>)> {
    let kind = config
        .get("type")
        .and_then(|t| t.as_str())
        .unwrap_or("bridge")
        .to_string();
    let paths = std::env::var("CNI_PATH").unwrap_or_default();
    let bin = paths
        .split(':')
        .map(|d| Path::new(d).join(&kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            (
                CniError {
                    code: 999,
                    msg: format!("failed to find plugin {kind:?}"),
                    details: format!("CNI_PATH={paths}"),
                },
                None,
            )
        })?;
    let mut child = Command::new(&bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            (
                CniError {
                    code: 999,
                    msg: format!("failed to run {}", bin.display()),
                    details: e.to_string(),
                },
                None,
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(config.to_string().as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| {
        (
            CniError {
                code: 999,
                msg: format!("{} failed", bin.display()),
                details: e.to_string(),
            },
            None,
        )
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err((
            CniError {
                code: 999,
                msg: format!("delegate {kind} failed"),
                details: stdout.clone(),
            },
            Some(stdout),
        ))
    }
}

fn saved_path(data_dir: &str, id: &str) -> PathBuf {
    Path::new(data_dir).join(id)
}

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        return fail(
            &CniError {
                code: 999,
                msg: "failed to read the network config from stdin".into(),
                details: e.to_string(),
            },
            "1.0.0",
        );
    }
    if command == "VERSION" {
        let v = parse_netconf(&input)
            .map(|c| c.cni_version)
            .unwrap_or_else(|_| "1.0.0".into());
        println!("{}", version_result(&v));
        return ExitCode::SUCCESS;
    }
    let conf = match parse_netconf(&input) {
        Ok(c) => c,
        Err(e) => return fail(&e, "1.0.0"),
    };
    let v = conf.cni_version.clone();
    let id = match env("CNI_CONTAINERID").and_then(|id| validate_container_id(&id).map(|()| id)) {
        Ok(id) => id,
        Err(e) => return fail(&e, &v),
    };
    let result = match command.as_str() {
        "ADD" => {
            let text = match std::fs::read_to_string(&conf.subnet_file) {
                Ok(t) => t,
                Err(e) => {
                    return fail(
                        &CniError {
                            code: 11,
                            msg: format!("failed to read {}", conf.subnet_file),
                            details: format!("{e}; is flanneld running?"),
                        },
                        &v,
                    );
                }
            };
            let fenv = match read_subnet_env(&text) {
                Ok(f) => f,
                Err(e) => return fail(&e, &v),
            };
            let cfg = delegate_config(&conf, &fenv);
            let path = saved_path(&conf.data_dir, &id);
            let saved = std::fs::create_dir_all(&conf.data_dir)
                .and_then(|()| std::fs::write(&path, cfg.to_string()));
            if let Err(e) = saved {
                return fail(
                    &CniError {
                        code: 999,
                        msg: format!("failed to save {}", path.display()),
                        details: e.to_string(),
                    },
                    &v,
                );
            }
            let r = delegate(&cfg);
            if r.is_err() {
                let _ = std::fs::remove_file(&path);
            }
            r
        }
        "DEL" | "CHECK" => {
            let path = saved_path(&conf.data_dir, &id);
            let mut cfg = match std::fs::read_to_string(&path) {
                Ok(t) => match serde_json::from_str::<serde_json::Value>(&t) {
                    Ok(c) if c.is_object() => c,
                    _ => {
                        return fail(
                            &CniError {
                                code: 999,
                                msg: format!("the saved config for {id} is corrupt"),
                                details: format!(
                                    "{} is not a JSON object; remove it to let DEL succeed",
                                    path.display()
                                ),
                            },
                            &v,
                        );
                    }
                },
                // DEL of something never added (or already deleted) succeeds.
                Err(_) if command == "DEL" => return ExitCode::SUCCESS,
                Err(e) => {
                    return fail(
                        &CniError {
                            code: 999,
                            msg: format!("no saved config for {id}"),
                            details: e.to_string(),
                        },
                        &v,
                    );
                }
            };
            // The runtime passes the ADD result as prevResult; the delegate needs it (CHECK requires it).
            if let (Some(prev), Some(obj)) = (conf.raw.get("prevResult"), cfg.as_object_mut()) {
                obj.insert("prevResult".into(), prev.clone());
            }
            let r = delegate(&cfg);
            if command == "DEL" && r.is_ok() {
                let _ = std::fs::remove_file(&path);
            }
            r
        }
        other => {
            return fail(
                &CniError {
                    code: 4,
                    msg: format!("unknown CNI_COMMAND {other:?}"),
                    details: "use ADD, DEL, CHECK or VERSION".into(),
                },
                &v,
            );
        }
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err((_, Some(delegate_error))) if !delegate_error.trim().is_empty() => {
            print!("{delegate_error}");
            ExitCode::from(1)
        }
        Err((e, _)) => fail(&e, &v),
    }
}
