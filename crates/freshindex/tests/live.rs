//! Live mode: `freshindex index --watch` keeps the target exact while files are created,
//! edited, renamed and deleted — one at a time and in a burst of 1,000 — without another run.

mod common;

use std::fs;

use common::{FlowConfig, TIMEOUT, Workspace};

fn settles(ws: &Workspace, what: &str) {
    common::settles(ws, what, &String::new);
}

#[test]
fn watch_follows_creates_edits_renames_deletes_and_bursts() {
    let ws = Workspace::new(FlowConfig::default());
    for i in 0..5 {
        ws.write(
            format!("notes/n{i}.md"),
            format!("# Note {i}\n\nNote {i} is about subject {i}.\n"),
        );
    }
    let mut child = ws.fi().args(["index", "--watch"]).spawn();
    assert!(
        child.wait_stderr("watching", TIMEOUT),
        "live mode did not start"
    );
    settles(&ws, "initial");

    ws.write("notes/new.md", "# New\n\nA brand new note about rivers.\n");
    settles(&ws, "create");
    ws.write(
        "notes/n1.md",
        "# Note 1\n\nNote 1 now talks about mountains.\n",
    );
    settles(&ws, "edit");
    fs::rename(
        ws.src().join("notes/n2.md"),
        ws.src().join("notes/n2-renamed.md"),
    )
    .expect("rename");
    settles(&ws, "rename");
    fs::remove_file(ws.src().join("notes/n3.md")).expect("delete");
    settles(&ws, "delete");
    // A folder moved in from outside: its files come with no event of their own.
    let outside = ws.root().join("outside");
    fs::create_dir_all(&outside).expect("mkdir");
    fs::write(
        outside.join("moved.md"),
        "# Moved\n\nMoved in with its folder.\n",
    )
    .expect("write");
    fs::rename(&outside, ws.src().join("moved-in")).expect("move folder in");
    settles(&ws, "folder moved in");

    for i in 0..1000 {
        ws.write(
            format!("burst/b{:02}/f{i:04}.md", i % 20),
            format!("# Burst {i}\n\nBurst file {i} mentions token{i}.\n"),
        );
    }
    settles(&ws, "burst of 1000 creates");
    for i in (0..1000).step_by(3) {
        fs::remove_file(ws.src().join(format!("burst/b{:02}/f{i:04}.md", i % 20))).expect("delete");
    }
    settles(&ws, "burst of deletes");

    assert!(!child.has_exited(), "live mode exited on its own");
    assert!(child.kill());
}
