//! The benchmarks' command lines: `--help` prints the usage and exits 0; an argument they do not
//! take is refused (exit 2, naming it) before any lab is built, instead of being taken for a
//! backend name or silently replaced by a default. No root needed: nothing runs past the check.

use std::process::Command;

fn run(exe: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{exe}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_bad_arguments_of_every_benchmark() {
    let benches = [
        (env!("CARGO_BIN_EXE_bench-throughput"), "foo", "\"foo\""),
        (env!("CARGO_BIN_EXE_bench-dataplane"), "99999", "\"99999\""),
        (env!("CARGO_BIN_EXE_bench-kube"), "abc", "\"abc\""),
        (env!("CARGO_BIN_EXE_bench-wireguard-cpu"), "0", "\"0\""),
        (env!("CARGO_BIN_EXE_bench-startup"), "x", "no arguments"),
    ];
    for (exe, bad, named) in benches {
        let (code, stdout, _) = run(exe, &["--help"]);
        assert_eq!(code, Some(0), "{exe} --help");
        assert!(stdout.starts_with("usage: "), "{exe} --help: {stdout}");
        let (code, _, stderr) = run(exe, &[bad]);
        assert_eq!(code, Some(2), "{exe} {bad}: {stderr}");
        assert!(stderr.contains(named), "{exe} {bad}: {stderr}");
        assert!(stderr.contains("usage: "), "{exe} {bad}: {stderr}");
    }
    // A number out of range after an option is refused too.
    let exe = env!("CARGO_BIN_EXE_bench-throughput");
    let (code, _, stderr) = run(exe, &["--rounds", "21", "vxlan"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--rounds must be a number from 1 to 20"),
        "{stderr}"
    );
    // `--pin` is an option (listed in the usage), not taken for a backend; the word after it is
    // still checked.
    let (_, stdout, _) = run(exe, &["--help"]);
    assert!(stdout.contains("--pin"), "{stdout}");
    let (code, _, stderr) = run(exe, &["--pin", "vxlan", "foo"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("\"foo\"") && !stderr.contains("\"--pin\""),
        "{stderr}"
    );
    // `--pin` takes its cores from the CPUs this process may run on: with one (taskset), it is
    // refused naming the one, before any lab is built (no root needed to get that far). The one
    // is the first CPU this test may use (CPU 0 need not be in its set).
    let cpu = flannel_tests::bench::allowed_cpus()[0].to_string();
    let out = Command::new("taskset")
        .args(["-c", &cpu, exe, "--pin", "vxlan"])
        .output()
        .expect("taskset (Debian package util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--pin needs two CPUs to run on; this process may use [{cpu}]"
        )),
        "{stderr}"
    );
}
