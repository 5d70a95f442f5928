//! The `mk-docker-opts` tool (Go flannel's `dist/mk-docker-opts.sh`): turns `subnet.env` into Docker
//! daemon options. Same options, same output; the rendering is the pure [`render`].

use std::collections::BTreeMap;

/// Options of the tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerOptsArgs {
    /// `-f`: the flannel env file.
    pub flannel_env: String,
    /// `-d`: the Docker env file to write.
    pub docker_env: String,
    /// `-i`: individual `DOCKER_OPT_*` variables.
    pub individual: bool,
    /// `-c`: the combined variable.
    pub combined: bool,
    /// `-k`: the combined variable's name.
    pub key: String,
    /// `-m`: leave out `--ip-masq`.
    pub no_ipmasq: bool,
}

/// The usage text (printed to stderr with exit status 1, as the script does).
pub const USAGE: &str =
    "mk-docker-opts [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
\t-f\tPath to flannel env file. Defaults to /run/flannel/subnet.env
\t-d\tPath to Docker env file to write to. Defaults to /run/docker_opts.env
\t-i\tOutput each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
\t-c\tOutput combined Docker options into DOCKER_OPTS var
\t-k\tSet the combined options key to this value (default DOCKER_OPTS=)
\t-m\tDo not output --ip-masq (useful for older Docker version)
";

/// Parses the command line (getopts `f:d:icmk:?h`). `Err(None)` means: print usage, exit 1.
pub fn parse_args(args: &[String]) -> Result<DockerOptsArgs, Option<String>> {
    let mut a = DockerOptsArgs {
        flannel_env: "/run/flannel/subnet.env".into(),
        docker_env: "/run/docker_opts.env".into(),
        individual: false,
        combined: false,
        key: "DOCKER_OPTS".into(),
        no_ipmasq: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            break; // getopts stops at the first non-option
        };
        let mut chars = flags.chars();
        while let Some(c) = chars.next() {
            match c {
                'i' => a.individual = true,
                'c' => a.combined = true,
                'm' => a.no_ipmasq = true,
                'f' | 'd' | 'k' => {
                    let rest: String = chars.by_ref().collect();
                    let value = if rest.is_empty() {
                        it.next().cloned().ok_or(None)?
                    } else {
                        rest
                    };
                    match c {
                        'f' => a.flannel_env = value,
                        'd' => a.docker_env = value,
                        _ => a.key = value,
                    }
                }
                _ => return Err(None),
            }
        }
    }
    if !a.individual && !a.combined {
        a.individual = true;
        a.combined = true;
    }
    Ok(a)
}

/// Reads `KEY=VALUE` lines (quotes and `export ` tolerated), as sourcing the file would set them:
/// [`flannel_core::subnet_env::read_vars`], the one reader of the format.
pub use flannel_core::subnet_env::read_vars as read_env;

/// The Docker env file's content for the flannel variables `vars`; `existing` is the current value of
/// the combined key in the environment. Fails on a `FLANNEL_IPMASQ` that is neither true nor false.
pub fn render(
    vars: &BTreeMap<String, String>,
    existing: &str,
    args: &DockerOptsArgs,
) -> Result<String, String> {
    let get = |k: &str| vars.get(k).filter(|v| !v.is_empty());
    // Alphabetical, as the script lists the DOCKER_OPT_ variables: BIP, IPMASQ, MTU.
    let mut opts: Vec<(&str, String)> = Vec::new();
    if let Some(s) = get("FLANNEL_SUBNET") {
        opts.push(("DOCKER_OPT_BIP", format!("--bip={s}")));
    }
    if let (Some(m), false) = (get("FLANNEL_IPMASQ"), args.no_ipmasq) {
        let inverse = match m.as_str() {
            "true" => "false",
            "false" => "true",
            other => return Err(format!("Invalid value of FLANNEL_IPMASQ: {other}")),
        };
        opts.push(("DOCKER_OPT_IPMASQ", format!("--ip-masq={inverse}")));
    }
    if let Some(m) = get("FLANNEL_MTU") {
        opts.push(("DOCKER_OPT_MTU", format!("--mtu={m}")));
    }
    let mut out = String::new();
    let mut combined = if existing.is_empty() {
        String::new()
    } else {
        format!("{existing} ")
    };
    for (name, value) in &opts {
        if args.individual {
            out.push_str(&format!("{name}=\"{value}\"\n"));
        }
        combined.push(' ');
        combined.push_str(value);
    }
    if args.combined {
        out.push_str(&format!("{}=\"{combined}\"\n", args.key));
    }
    Ok(out)
}

/// The network address of `FLANNEL_SUBNET` (`10.1.74.1/24` → `10.1.74.0/24`) as the script derives it,
/// to refuse a routing table that already routes the subnet `via` somewhere.
pub fn subnet_network(flannel_subnet: &str) -> Option<String> {
    let net: ipnet::Ipv4Net = flannel_subnet.parse().ok()?;
    Some(net.trunc().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";

    fn run(flags: &[&str]) -> String {
        let args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        render(&read_env(SAMPLE), "", &parse_args(&args).unwrap()).unwrap()
    }

    #[test]
    fn upstream_golden_cases() {
        assert_eq!(
            run(&[]),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
        );
        assert_eq!(
            run(&["-i"]),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\n"
        );
        assert_eq!(
            run(&["-c"]),
            "DOCKER_OPTS=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
        );
        assert_eq!(
            run(&["-k", "CUSTOM_KEY"]),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nCUSTOM_KEY=\" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
        );
        assert_eq!(
            run(&["-m"]),
            "DOCKER_OPT_BIP=\"--bip=10.1.74.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1472\"\nDOCKER_OPTS=\" --bip=10.1.74.1/24 --mtu=1472\"\n"
        );
    }

    #[test]
    fn existing_value_and_errors() {
        let args = parse_args(&["-c".into()]).unwrap();
        assert_eq!(
            render(&read_env(SAMPLE), "--debug", &args).unwrap(),
            "DOCKER_OPTS=\"--debug  --bip=10.1.74.1/24 --ip-masq=true --mtu=1472\"\n"
        );
        let bad = read_env("FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPMASQ=yes\n");
        assert_eq!(
            render(&bad, "", &args).unwrap_err(),
            "Invalid value of FLANNEL_IPMASQ: yes"
        );
        assert_eq!(parse_args(&["-h".into()]), Err(None));
        assert_eq!(parse_args(&["-x".into()]), Err(None));
        let a = parse_args(&[
            "-fsub.env".into(),
            "-d".into(),
            "out.env".into(),
            "-ic".into(),
        ])
        .unwrap();
        assert_eq!(
            (
                a.flannel_env.as_str(),
                a.docker_env.as_str(),
                a.individual,
                a.combined
            ),
            ("sub.env", "out.env", true, true)
        );
        assert_eq!(
            subnet_network("10.1.74.1/24").as_deref(),
            Some("10.1.74.0/24")
        );
    }
}
