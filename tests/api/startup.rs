//! Start-up: a bad configuration stops a binary at once, naming the key.

use std::process::Command;

fn run_with(binary: &str, args: &[&str], key: &str, value: &str) -> (Option<i32>, String) {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_producer"))
        .parent()
        .unwrap_or_else(|| panic!("binaries have a directory"))
        .join(binary);
    let output = Command::new(path)
        .args(args)
        .env(key, value)
        .env(
            "COURIER_CONFIG_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
        )
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_bad_config_value_stops_every_binary_with_the_key_that_is_wrong() {
    for (binary, args, key, value, named) in [
        (
            "consumer",
            &[][..],
            "COURIER__CONSUMER__PREFETCH",
            "lots",
            "consumer.prefetch",
        ),
        (
            "producer",
            &[],
            "COURIER__DATABASE__PORT",
            "99999",
            "database.port",
        ),
        (
            "payment-gateway",
            &[],
            "COURIER__GATEWAY_SIMULATOR__TRANSIENT_ERROR_RATE",
            "2.5",
            "gateway_simulator.transient_error_rate",
        ),
        (
            "courier",
            &["migrate"],
            "COURIER__TOPOLOGY__RETRY_DELAYS",
            "[]",
            "topology.retry_delays",
        ),
        (
            "consumer",
            &[],
            "COURIER__CONSUMER__WORKERS",
            "[\"refunds\",\"refundz\"]",
            "consumer.workers",
        ),
        // The order service's worker is not the consumer's to run.
        (
            "consumer",
            &[],
            "COURIER__CONSUMER__WORKERS",
            "[\"orders.refund-status\"]",
            "consumer.workers",
        ),
    ] {
        let (code, stderr) = run_with(binary, args, key, value);
        assert_eq!(code, Some(2), "{binary} with {key}={value}: {stderr}");
        assert!(stderr.contains(named), "{binary} names `{named}`: {stderr}");
    }
}

#[test]
fn a_password_that_looks_like_a_number_is_used_as_given_and_never_printed() {
    // It gets past the configuration (it used to stop there, exit 2, quoting
    // the password) and reaches PostgreSQL as the password: exit 0 where the
    // server trusts local logins, exit 1 where it refuses this password.
    let (code, stderr) = run_with(
        "courier",
        &["migrate"],
        "COURIER__DATABASE__PASSWORD",
        "8675309123",
    );
    assert!(matches!(code, Some(0 | 1)), "{code:?}: {stderr}");
    assert!(!stderr.contains("configuration key"), "{stderr}");
    assert!(!stderr.contains("8675309123"), "{stderr}");
}
