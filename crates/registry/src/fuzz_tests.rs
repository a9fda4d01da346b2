//! Bounded fuzzing of registration parsing (`keel_serve::fuzz`), in every dialect:
//! any bytes are refused or accepted without a panic, and what is accepted is within
//! the limits and reads back the same from its canonical form. `KEEL_FUZZ_INPUTS`
//! runs it long by hand.

use keel_serve::fuzz::{Budget, run};

use crate::registration::{
    MAX_META_BYTES, MAX_NAME, MAX_REQUIRED, MAX_URL, Registration, parse_identity,
};

const SEEDS: &[&[u8]] = &[
    br#"{"name":"grading","addr":"127.0.0.1:20004","required_services":["log"],"update_url":"http://127.0.0.1:20004/services","heartbeat_url":"127.0.0.1:20004/heart-beat","meta":{"zone":"a"},"ttl":"15s"}"#,
    br#"{"Name":"visit","Addr":"localhost:20003","RequiredServices":["log","grading"]}"#,
    br#"{"ServiceName":"portal","ServiceURL":"http://127.0.0.1:20005/base","RequiredServices":["grading"],"ServiceUpdateURL":"http://127.0.0.1:20005/services","HeartbeatURL":"http://127.0.0.1:20005/heartbeat"}"#,
    br#"{"name":"x","addr":"https://[::1]:8443/a/b/"}"#,
];

#[test]
fn registrations_should_never_panic_and_what_is_accepted_should_be_bounded_and_read_back() {
    run(SEEDS, Budget::default(), |input| {
        let _ = parse_identity(input);
        let Ok(registration) = Registration::parse(input) else {
            return;
        };
        assert!(!registration.name.is_empty() && registration.name.len() <= MAX_NAME);
        assert!(registration.url.len() <= MAX_URL + 16);
        assert!(registration.required_services.len() <= MAX_REQUIRED);
        let meta: usize = registration
            .meta
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        assert!(meta <= MAX_META_BYTES);
        assert!(
            registration.url.bytes().all(|b| b.is_ascii_graphic()),
            "{:?}",
            registration.url
        );
        let canonical = registration.to_canonical_json().to_string();
        assert_eq!(
            Registration::parse(canonical.as_bytes()).ok().as_ref(),
            Some(&registration),
            "{canonical}"
        );
    });
}
