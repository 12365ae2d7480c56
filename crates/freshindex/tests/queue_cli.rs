//! `freshindex queue …` against the local data directory: round trips of push, show, list,
//! poll, unreserve and delete-queue-items, and errors that name the field at fault.

mod common;

use serde_json::Value;

use common::Workspace;
use common::http::push_workspace;

fn q(ws: &Workspace, args: &[&str]) -> common::Outcome {
    ws.fi().arg("queue").args(args).run()
}

fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().expect("items array").clone()
}

fn names(v: &Value) -> Vec<String> {
    items(v)
        .iter()
        .map(|i| i["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn push_poll_list_show_unreserve_round_trip() {
    let ws = push_workspace();
    let pushed = q(
        &ws,
        &[
            "push",
            "--flow",
            "docs",
            "notes/one.md",
            "--content-hash",
            "h1",
            "--payload",
            "hello",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(pushed["status"], "NEW_ITEM");
    assert_eq!(pushed["payload"], "aGVsbG8=");
    assert_eq!(pushed["queue"], "default");
    // --flow may be left out: the config declares one flow.
    let human = q(&ws, &["push", "b", "--type", "MODIFIED", "--queue", "A"]).ok();
    assert_eq!(human.stdout.trim(), "b: NEW_ITEM (queue A)");

    let shown = q(&ws, &["show", "--flow", "docs", "notes/one.md", "--json"])
        .ok()
        .json();
    assert_eq!(shown["contentHash"], "h1");
    assert_eq!(shown["leased"], false);
    let human = q(&ws, &["show", "--flow", "docs", "notes/one.md"])
        .ok()
        .stdout;
    assert!(human.contains("payload    hello"), "{human}");
    assert!(human.contains("status     NEW_ITEM"), "{human}");

    let listed = q(&ws, &["list", "--flow", "docs", "--json"]).ok().json();
    assert_eq!(names(&listed), ["b", "notes/one.md"]);
    let by_queue = q(&ws, &["list", "--flow", "docs", "--queue", "A", "--json"])
        .ok()
        .json();
    assert_eq!(names(&by_queue), ["b"]);
    let accepted = q(&ws, &["list", "--flow", "docs", "--status", "ACCEPTED"]).ok();
    assert_eq!(accepted.stdout.trim(), "no items");

    let first = q(&ws, &["poll", "--flow", "docs", "--limit", "1", "--json"])
        .ok()
        .json();
    assert_eq!(items(&first).len(), 1);
    assert_eq!(items(&first)[0]["leased"], true);
    assert_eq!(items(&first)[0]["leaseOwner"], "cli");
    let second = q(&ws, &["poll", "--flow", "docs", "--owner", "w2", "--json"])
        .ok()
        .json();
    assert_eq!(
        items(&second).len(),
        1,
        "the leased entry is not handed out twice"
    );
    assert_ne!(items(&first)[0]["name"], items(&second)[0]["name"]);
    let none = q(&ws, &["poll", "--flow", "docs"]).ok();
    assert_eq!(none.stdout.trim(), "nothing to poll");
    let human = q(&ws, &["list", "--flow", "docs"]).ok().stdout;
    assert!(human.contains("leased by cli"), "{human}");

    let released = q(
        &ws,
        &["unreserve", "--flow", "docs", "--owner", "w2", "--json"],
    )
    .ok()
    .json();
    assert_eq!(released["unreserved"], 1);
    let released = q(&ws, &["unreserve", "--flow", "docs"]).ok();
    assert_eq!(released.stdout.trim(), "released 1 lease");
    let listed = q(&ws, &["list", "--flow", "docs", "--json"]).ok().json();
    assert!(
        items(&listed).iter().all(|i| i["leased"] == false),
        "{listed}"
    );
    let again = q(&ws, &["poll", "--flow", "docs", "--json"]).ok().json();
    assert_eq!(items(&again).len(), 2);
    // Attempts count polls since the last index.
    assert!(items(&again).iter().all(|i| i["attempts"] == 2), "{again}");
}

#[test]
fn delete_queue_items_forgets_what_the_label_still_holds() {
    let ws = push_workspace();
    for (key, label) in [("x", "A"), ("y", "A"), ("z", "B")] {
        q(&ws, &["push", key, "--content-hash", "h", "--queue", label]).ok();
    }
    // A traversal labelled B saw y again: y moves to B and survives.
    q(&ws, &["push", "y", "--content-hash", "h", "--queue", "B"]).ok();
    let gone = q(
        &ws,
        &["delete-queue-items", "--flow", "docs", "A", "--json"],
    )
    .ok()
    .json();
    assert_eq!(gone["deleted"], 1);
    let listed = q(&ws, &["list", "--json"]).ok().json();
    assert_eq!(names(&listed), ["y", "z"]);
    let human = q(&ws, &["delete-queue-items", "A"]).ok();
    assert_eq!(human.stdout.trim(), "deleted 0 items labelled A");
}

/// Asserts a refused command whose stderr names `needle`.
fn refused(out: common::Outcome, code: i32, needle: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "`{}`: expected exit {code}\nstderr:\n{}",
        out.desc,
        out.stderr
    );
    assert!(
        out.stderr.contains(needle),
        "`{}`: stderr does not name {needle:?}:\n{}",
        out.desc,
        out.stderr
    );
}

#[test]
fn errors_name_the_field() {
    let ws = push_workspace();
    q(&ws, &["push", "a", "--content-hash", "h"]).ok();
    // Usage errors (exit 2): a type and hashes, or neither.
    refused(
        q(
            &ws,
            &["push", "a", "--type", "MODIFIED", "--content-hash", "h"],
        ),
        2,
        "--type",
    );
    refused(q(&ws, &["push", "a"]), 2, "--type");
    // Invalid values (exit 1).
    refused(q(&ws, &["push", "a", "--type", "DELETED"]), 1, "--type");
    let big = "x".repeat(8193);
    refused(
        q(
            &ws,
            &["push", "a", "--content-hash", "h", "--payload", &big],
        ),
        1,
        "--payload",
    );
    refused(
        q(&ws, &["push", "a", "--content-hash", ""]),
        1,
        "--content-hash",
    );
    refused(q(&ws, &["push", "", "--content-hash", "h"]), 1, "KEY");
    refused(q(&ws, &["poll", "--limit", "0"]), 1, "--limit");
    refused(q(&ws, &["poll", "--limit", "500"]), 1, "--limit");
    refused(q(&ws, &["poll", "--status", "DONE"]), 1, "--status");
    refused(
        q(&ws, &["list", "--status", "NEW_ITEM,DONE"]),
        1,
        "--status",
    );
    refused(q(&ws, &["poll", "--lease-secs", "0"]), 2, "--lease-secs");
    // State errors name the item or flow.
    refused(q(&ws, &["show", "nobody"]), 1, "nobody");
    refused(
        q(&ws, &["push", "a", "--type", "REQUEUE"]),
        1,
        "not reserved",
    );
    refused(
        q(&ws, &["push", "ghost", "--type", "NOT_MODIFIED"]),
        1,
        "ghost",
    );
    refused(q(&ws, &["list", "--flow", "nope"]), 1, "nope");
    // Nothing refused changed the queue.
    let listed = q(&ws, &["list", "--json"]).ok().json();
    assert_eq!(names(&listed), ["a"]);
    assert_eq!(items(&listed)[0]["status"], "NEW_ITEM");
}
