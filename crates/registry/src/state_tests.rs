use super::*;

fn registration(name: &str, port: u16, required: &[&str]) -> Registration {
    Registration {
        name: name.into(),
        url: format!("http://127.0.0.1:{port}"),
        required_services: required.iter().map(|s| (*s).to_owned()).collect(),
        update_url: Some(format!("http://127.0.0.1:{port}/services")),
        heartbeat_url: Some(format!("http://127.0.0.1:{port}/heart-beat")),
        meta: BTreeMap::new(),
        ttl_ms: None,
    }
}

fn register(state: &mut RegistryState, name: &str, port: u16, at_ms: u64) -> Vec<Event> {
    state
        .apply(Command::Register {
            registration: registration(name, port, &[]),
            at_ms,
        })
        .expect("register")
}

fn set(state: &mut RegistryState, name: &str, port: u16, health: Health, at_ms: u64) -> Vec<Event> {
    let id = format!("127.0.0.1:{port}");
    state
        .apply(Command::SetHealth {
            name: name.into(),
            id,
            health,
            at_ms,
        })
        .expect("set health")
}

fn ids(instances: &[Instance]) -> Vec<&str> {
    instances.iter().map(|i| i.id.as_str()).collect()
}

#[test]
fn given_new_instance_register_should_make_it_available_and_announce_it() {
    let mut state = RegistryState::default();
    let events = register(&mut state, "log", 1, 100);
    assert!(
        matches!(&events[..], [Event::Available(i)] if i.id == "127.0.0.1:1" && i.name == "log")
    );
    assert_eq!(state.index(), 1);
    assert_eq!(ids(&state.available("log")), ["127.0.0.1:1"]);
    assert_eq!(
        state
            .instance("log", "127.0.0.1:1")
            .map(|i| i.registered_at_ms),
        Some(100)
    );
}

#[test]
fn given_same_name_and_address_register_should_update_not_duplicate() {
    let mut state = RegistryState::default();
    register(&mut state, "log", 1, 100);
    let mut again = registration("log", 1, &["other"]);
    again.meta.insert("version".into(), "2".into());
    let events = state
        .apply(Command::Register {
            registration: again,
            at_ms: 200,
        })
        .unwrap();
    assert!(events.is_empty(), "still available: nothing to announce");
    assert_eq!(state.instances("log").count(), 1);
    let instance = state.instance("log", "127.0.0.1:1").unwrap();
    assert_eq!(
        (
            instance.meta["version"].as_str(),
            instance.required_services.as_slice()
        ),
        ("2", &["other".to_owned()][..])
    );
    assert_eq!(state.index(), 2, "an update is a change");
}

#[test]
fn given_critical_instance_register_again_should_revive_it() {
    let mut state = RegistryState::default();
    register(&mut state, "log", 1, 100);
    set(&mut state, "log", 1, Health::Critical, 150);
    let events = register(&mut state, "log", 1, 200);
    assert!(matches!(&events[..], [Event::Available(_)]));
    assert_eq!(
        state
            .instance("log", "127.0.0.1:1")
            .unwrap()
            .critical_since_ms,
        None
    );
}

#[test]
fn deregister_should_announce_and_remove_and_unknown_should_change_nothing() {
    let mut state = RegistryState::default();
    register(&mut state, "log", 1, 100);
    let events = state
        .apply(Command::Deregister {
            name: "log".into(),
            id: "127.0.0.1:1".into(),
        })
        .unwrap();
    assert!(matches!(&events[..], [Event::Unavailable(i)] if i.id == "127.0.0.1:1"));
    assert!(state.available("log").is_empty());
    let index = state.index();
    let err = state
        .apply(Command::Deregister {
            name: "log".into(),
            id: "127.0.0.1:1".into(),
        })
        .unwrap_err();
    assert!(matches!(err, RegistryError::UnknownInstance { .. }));
    assert_eq!(state.index(), index, "a failed command changes nothing");
}

#[test]
fn health_flips_should_announce_once_each_way() {
    let mut state = RegistryState::default();
    register(&mut state, "log", 1, 100);
    register(&mut state, "log", 2, 100);
    let events = set(&mut state, "log", 1, Health::Critical, 200);
    assert!(matches!(&events[..], [Event::Unavailable(i)] if i.critical_since_ms == Some(200)));
    assert_eq!(
        ids(&state.available("log")),
        ["127.0.0.1:2"],
        "critical instances are hidden"
    );
    let index = state.index();
    assert!(set(&mut state, "log", 1, Health::Critical, 300).is_empty());
    assert_eq!(state.index(), index, "no flip, no change");
    assert!(matches!(
        &set(&mut state, "log", 1, Health::Passing, 400)[..],
        [Event::Available(_)]
    ));
    assert_eq!(state.available("log").len(), 2);
}

#[test]
fn reap_should_remove_instances_critical_for_long_enough_and_only_those() {
    let mut state = RegistryState::default();
    register(&mut state, "log", 1, 0);
    register(&mut state, "log", 2, 0);
    set(&mut state, "log", 1, Health::Critical, 1_000);
    let reap = |now_ms| Command::Reap {
        now_ms,
        deregister_after_ms: 5_000,
        grace_from_ms: 0,
    };
    assert!(state.apply(reap(5_999)).unwrap().is_empty());
    assert_eq!(state.instances("log").count(), 2, "not yet");
    let index = state.index();
    assert!(
        state.apply(reap(6_000)).unwrap().is_empty(),
        "it was already announced as gone"
    );
    assert_eq!(
        ids(&state.instances("log").cloned().collect::<Vec<_>>()),
        ["127.0.0.1:2"]
    );
    assert_eq!(state.index(), index + 1);
    state.apply(reap(1_000_000)).unwrap();
    assert_eq!(
        state.instances("log").count(),
        1,
        "a passing instance is never removed"
    );
}

#[test]
fn ttl_instances_should_turn_critical_without_heartbeats_and_revive_with_one() {
    let mut state = RegistryState::default();
    let registration = Registration {
        ttl_ms: Some(1_000),
        ..registration("visit", 3, &[])
    };
    state
        .apply(Command::Register {
            registration,
            at_ms: 0,
        })
        .unwrap();
    let heartbeat = |at_ms| Command::Heartbeat {
        name: "visit".into(),
        id: "127.0.0.1:3".into(),
        at_ms,
    };
    assert!(state.apply(heartbeat(900)).unwrap().is_empty());
    let reap = |now_ms| Command::Reap {
        now_ms,
        deregister_after_ms: 60_000,
        grace_from_ms: 0,
    };
    assert!(
        state.apply(reap(1_800)).unwrap().is_empty(),
        "within the TTL of the last heartbeat"
    );
    assert!(matches!(
        &state.apply(reap(2_000)).unwrap()[..],
        [Event::Unavailable(_)]
    ));
    assert!(matches!(
        &state.apply(heartbeat(2_100)).unwrap()[..],
        [Event::Available(_)]
    ));
    let err = state
        .apply(Command::Heartbeat {
            name: "visit".into(),
            id: "nope".into(),
            at_ms: 1,
        })
        .unwrap_err();
    assert!(matches!(err, RegistryError::UnknownInstance { .. }));
}

#[test]
fn dependents_and_required_by_should_answer_from_the_current_state() {
    let mut state = RegistryState::default();
    let portal = registration("portal", 10, &["grading", "log"]);
    let mut quiet = registration("batch", 11, &["log"]);
    quiet.update_url = None;
    for registration in [portal, quiet] {
        state
            .apply(Command::Register {
                registration,
                at_ms: 0,
            })
            .unwrap();
    }
    register(&mut state, "log", 1, 0);
    assert_eq!(
        ids(&state.dependents("log")),
        ["127.0.0.1:10"],
        "only instances with an update URL"
    );
    let answer = state.required_by(&["grading".into(), "log".into()]);
    assert!(
        answer["grading"].is_empty(),
        "an empty list when none are available"
    );
    assert_eq!(ids(&answer["log"]), ["127.0.0.1:1"]);
}

#[test]
fn the_same_commands_should_give_the_same_state() {
    let commands = [
        Command::Register {
            registration: registration("a", 1, &["b"]),
            at_ms: 1,
        },
        Command::Register {
            registration: Registration {
                ttl_ms: Some(10),
                ..registration("b", 2, &[])
            },
            at_ms: 2,
        },
        Command::Reap {
            now_ms: 20,
            deregister_after_ms: 5,
            grace_from_ms: 0,
        },
        Command::Register {
            registration: registration("b", 3, &[]),
            at_ms: 21,
        },
        Command::Reap {
            now_ms: 30,
            deregister_after_ms: 5,
            grace_from_ms: 0,
        },
    ];
    let run = || {
        let mut state = RegistryState::default();
        let events: Vec<Vec<Event>> = commands
            .iter()
            .cloned()
            .map(|c| state.apply(c).unwrap())
            .collect();
        let snapshot = serde_json::to_string(&state.all().collect::<Vec<_>>()).unwrap();
        (events, snapshot, state.index())
    };
    assert_eq!(run(), run());
    let (_, snapshot, _) = run();
    assert!(
        !snapshot.contains("127.0.0.1:2"),
        "b@2 missed its TTL and was reaped: {snapshot}"
    );
}

fn deregister(state: &mut RegistryState, name: &str, port: u16) {
    state
        .apply(Command::Deregister {
            name: name.into(),
            id: format!("127.0.0.1:{port}"),
        })
        .expect("deregister");
}

#[test]
fn a_watcher_should_get_only_the_services_changed_since_its_index() {
    let mut state = RegistryState::default();
    register(&mut state, "log", 1, 100);
    register(&mut state, "grading", 2, 100);
    register(&mut state, "visit", 3, 100);

    let first = state.changes_since(0);
    assert!(first.full, "index 0 gets the whole table");
    assert_eq!(first.changed, ["grading", "log", "visit"]);
    assert_eq!(first.instances.len(), 3);

    let seen = state.index();
    set(&mut state, "log", 1, Health::Critical, 200);
    deregister(&mut state, "visit", 3);
    let delta = state.changes_since(seen);
    assert!(!delta.full);
    assert_eq!(delta.changed, ["log", "visit"], "grading did not change");
    assert_eq!(ids(&delta.instances), ["127.0.0.1:1"], "visit is gone");
    assert_eq!(delta.index, state.index());

    let nothing = state.changes_since(state.index());
    assert!(!nothing.full && nothing.changed.is_empty() && nothing.instances.is_empty());
    let restarted = state.changes_since(state.index() + 10);
    assert!(
        restarted.full,
        "an index from before a restart gets the whole table"
    );
}

#[test]
fn a_heartbeat_that_changes_no_health_should_wake_no_watcher() {
    let mut state = RegistryState::default();
    let mut registration = registration("ttl", 1, &[]);
    registration.ttl_ms = Some(1000);
    state
        .apply(Command::Register {
            registration,
            at_ms: 100,
        })
        .expect("register");
    let index = state.index();
    state
        .apply(Command::Heartbeat {
            name: "ttl".into(),
            id: "127.0.0.1:1".into(),
            at_ms: 500,
        })
        .expect("heartbeat");
    assert_eq!(state.index(), index);
    assert_eq!(
        state.instance("ttl", "127.0.0.1:1").map(|i| i.last_seen_ms),
        Some(500)
    );
}

#[test]
fn names_that_come_and_go_should_not_grow_the_state_and_old_watchers_resync() {
    let mut state = RegistryState::default();
    register(&mut state, "stays", 1, 100);
    let early = state.index();
    for n in 0..3000u16 {
        let name = format!("gone-{n}");
        register(&mut state, &name, 2, 100);
        deregister(&mut state, &name, 2);
    }
    assert!(
        state.modified.len() <= 1 + REMEMBERED_REMOVALS,
        "{} services remembered",
        state.modified.len()
    );
    assert!(
        state.changes_since(early).full,
        "a watcher from before the forgetting resyncs"
    );
    let recent = state.index() - 2;
    let delta = state.changes_since(recent);
    assert!(!delta.full);
    assert_eq!(delta.changed, ["gone-2999"]);
}

#[test]
fn a_new_leaders_grace_should_hold_back_ttl_expiry_and_reap_due_should_agree() {
    let mut state = RegistryState::default();
    let registration = Registration {
        ttl_ms: Some(1_000),
        ..registration("visit", 3, &[])
    };
    state
        .apply(Command::Register {
            registration,
            at_ms: 0,
        })
        .unwrap();
    let reap = |now_ms, grace_from_ms| Command::Reap {
        now_ms,
        deregister_after_ms: 60_000,
        grace_from_ms,
    };
    // The heartbeats of the last second went to a leader that died: the next one
    // took over at 5 000 and gives the instance a full TTL from then.
    assert!(!state.reap_due(5_500, 60_000, 5_000));
    assert!(state.apply(reap(5_500, 5_000)).unwrap().is_empty());
    assert!(state.reap_due(6_001, 60_000, 5_000));
    let events = state.apply(reap(6_001, 5_000)).unwrap();
    assert!(matches!(events.as_slice(), [Event::Unavailable(_)]));
    assert!(!state.reap_due(6_002, 60_000, 5_000), "already critical");
    assert!(
        state.reap_due(66_001, 60_000, 5_000),
        "critical long enough to go"
    );
}

#[test]
fn the_state_and_commands_should_survive_their_encoding() {
    let mut state = RegistryState::default();
    register(&mut state, "log", 1, 10);
    register(&mut state, "visit", 2, 20);
    set(&mut state, "visit", 2, Health::Critical, 30);
    state
        .apply(Command::Deregister {
            name: "log".into(),
            id: "127.0.0.1:1".into(),
        })
        .unwrap();
    let bytes = serde_json::to_vec(&state).unwrap();
    let back: RegistryState = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(back, state);
    assert_eq!(back.changes_since(1), state.changes_since(1));

    for command in [
        Command::Register {
            registration: Registration {
                ttl_ms: Some(5),
                ..registration("grading", 4, &["log"])
            },
            at_ms: 7,
        },
        Command::Heartbeat {
            name: "grading".into(),
            id: "127.0.0.1:4".into(),
            at_ms: 8,
        },
        Command::Reap {
            now_ms: 9,
            deregister_after_ms: 10,
            grace_from_ms: 11,
        },
    ] {
        let bytes = serde_json::to_vec(&command).unwrap();
        assert_eq!(serde_json::from_slice::<Command>(&bytes).unwrap(), command);
    }
}

fn claim(principal: &str, admin: bool, secret: &str) -> Claim {
    Claim {
        principal: principal.into(),
        admin,
        secret: secret.into(),
    }
}

fn register_as(
    state: &mut RegistryState,
    port: u16,
    required: &[&str],
    by: &Claim,
) -> Result<Vec<Notice>> {
    state
        .apply_claimed(
            Command::Register {
                registration: registration("visit", port, required),
                at_ms: 1,
            },
            Some(by),
        )
        .map(|(_, notices)| notices)
}

#[test]
fn only_the_owner_or_an_admin_should_change_or_remove_an_instance() {
    let mut state = RegistryState::default();
    let alice = claim("alice", false, "alice-secret");
    register_as(&mut state, 1, &[], &alice).expect("registered");
    let owner = state.owner("visit", "127.0.0.1:1").expect("an owner");
    assert_eq!(
        (owner.principal.as_str(), owner.secret.as_str()),
        ("alice", "alice-secret")
    );

    // Another principal may neither re-register it (and so redirect its
    // notifications), nor heartbeat it, nor remove it.
    let mallory = claim("mallory", false, "mallory-secret");
    let refused = register_as(&mut state, 1, &[], &mallory);
    assert!(
        matches!(refused, Err(RegistryError::NotOwner { ref owner, .. }) if owner == "alice"),
        "{refused:?}"
    );
    for command in [
        Command::Deregister {
            name: "visit".into(),
            id: "127.0.0.1:1".into(),
        },
        Command::Heartbeat {
            name: "visit".into(),
            id: "127.0.0.1:1".into(),
            at_ms: 2,
        },
    ] {
        let refused = state.apply_claimed(command, Some(&mallory));
        assert!(
            matches!(refused, Err(RegistryError::NotOwner { .. })),
            "{refused:?}"
        );
    }
    assert!(state.instance("visit", "127.0.0.1:1").is_some());

    // Its owner re-registers it and keeps its secret; an admin may remove it.
    register_as(&mut state, 1, &[], &claim("alice", false, "another")).expect("re-registered");
    assert_eq!(
        state
            .owner("visit", "127.0.0.1:1")
            .map(|o| o.secret.as_str()),
        Some("alice-secret")
    );
    state
        .apply_claimed(
            Command::Deregister {
                name: "visit".into(),
                id: "127.0.0.1:1".into(),
            },
            Some(&claim("ops", true, "")),
        )
        .expect("removed by an admin");
    assert_eq!(state.owner("visit", "127.0.0.1:1"), None);
    // Gone, it is anyone's to register.
    register_as(&mut state, 1, &[], &mallory).expect("registered anew");
}

#[test]
fn notifications_should_carry_the_dependents_secret() {
    let mut state = RegistryState::default();
    // A dependent of `log`, told at once of what it requires, then of a new one.
    register(&mut state, "log", 2, 1);
    let told =
        register_as(&mut state, 1, &["log"], &claim("alice", false, "s1")).expect("registered");
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].secret.as_deref(), Some("s1"));
    let (_, notices) = state
        .apply_noting(Command::Register {
            registration: registration("log", 3, &[]),
            at_ms: 2,
        })
        .expect("registered");
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].secret.as_deref(), Some("s1"));
}
