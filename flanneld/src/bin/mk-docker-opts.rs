//! `mk-docker-opts`: Docker daemon options from flannel's subnet.env (Go flannel's mk-docker-opts.sh).

use std::process::ExitCode;

use flanneld::docker_opts::{USAGE, parse_args, read_env, render, subnet_network};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Ok(opts) = parse_args(&args) else {
        eprint!("{USAGE}");
        return ExitCode::from(1);
    };
    // A missing flannel env file is not an error (the script only sources it when present).
    let vars = std::fs::read_to_string(&opts.flannel_env)
        .map(|t| read_env(&t))
        .unwrap_or_default();
    let existing = std::env::var(&opts.key).unwrap_or_default();
    let text = match render(&vars, &existing, &opts) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = std::fs::write(&opts.docker_env, text) {
        eprintln!("mk-docker-opts: writing {}: {e}", opts.docker_env);
        return ExitCode::from(1);
    }
    if let Some(net) = vars.get("FLANNEL_SUBNET").and_then(|s| subnet_network(s)) {
        let routes = std::process::Command::new("ip")
            .args(["route", "show"])
            .output();
        if let Ok(out) = routes {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(line) = text.lines().find(|l| l.contains(&net) && l.contains("via")) {
                eprintln!("Your routing table already contains the subnet: {line}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
